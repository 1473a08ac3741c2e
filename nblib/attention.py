"""The pretraining attention variants: one table, read by training, run folders, report and pipeline.

A variant is a run folder ``runs/pretrain-<key>/`` with its number of key/value heads and how its
weights start: ``scratch`` (random, notebook 03 for MHA, 04 for the rest) or ``convert`` (the
finished ``source`` run of the same seed with its K/V heads pooled per group by ``method``, then
uptrained for a fraction of the source's steps: Ainslie et al. 2023, arXiv 2305.13245, which
compares mean pooling with keeping the first head and random initialisation). ``match`` says what
a variant keeps equal to MHA: the width (the K/V projections shrink) or, as the Llama 2 paper's
GQA ablation does, the parameter count (the MLP widened by ``nblib.model.matched_d_mlp``).
Which variants a profile runs is the ``variants`` setting of ``profiles/train.yaml``; adding one is an
entry here (and its key there). Foundations layer: imports only ``config``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from nblib.config import SettingsError

MATCHES = {"width": "equal width", "params": "equal parameters"}  # match -> the report's wording


@dataclass(frozen=True)
class Variant:
    """One pretraining variant; ``n_kv_head`` ``None`` means as many as ``n_head`` (MHA)."""

    key: str
    n_kv_head: int | None
    label: str
    colour: str
    init: str = "scratch"
    source: str | None = None  # key of the variant converted from (init "convert")
    method: str | None = None  # nblib.convert.convert_kv_heads method: mean | first | random
    match: str = "width"  # a key of MATCHES: what is kept equal to MHA
    alpha: float | None = None  # uptraining steps / the source's; None: the profile's uptrain_fraction

    @property
    def matched(self) -> str:
        """``equal width`` or ``equal parameters`` (the run summary's ``matched``)."""
        return MATCHES[self.match]

    @property
    def folder(self) -> str:
        """The run folder name under ``runs/``."""
        return f"pretrain-{self.key}"

    @property
    def converted(self) -> bool:
        return self.init == "convert"

    def kv_heads(self, n_head: int) -> int:
        return n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def notebook(self) -> str:
        """The notebook that trains it: 03 MHA, 04 every other variant of the profile."""
        return "03_train_mha" if self.key == BASELINE else "04_train_gqa"


BASELINE = "mha"  # what every other pretraining variant is compared with (and converted from)
REQUIRED = ("mha", "gqa")  # every profile runs these; the report cannot do without them
VARIANTS: dict[str, Variant] = {v.key: v for v in (
    Variant("mha", None, "MHA", "#1f77b4"),
    Variant("gqa4", 4, "GQA-4", "#17becf"),
    Variant("gqa", 2, "GQA", "#ff7f0e"),
    Variant("gqa-params", 2, "GQA (equal params)", "#bcbd22", match="params"),
    Variant("mqa", 1, "MQA", "#2ca02c"),
    Variant("gqa-uptrained", 2, "GQA uptrained", "#d62728", "convert", "mha", "mean"),
    Variant("mqa-uptrained", 1, "MQA uptrained", "#9467bd", "convert", "mha", "mean"),
    Variant("gqa-uptrained-first", 2, "GQA uptrained (first)", "#8c564b", "convert", "mha", "first"),
    Variant("gqa-uptrained-random", 2, "GQA uptrained (random)", "#7f7f7f", "convert", "mha", "random"),
    # the GQA paper's Figure 5: quality against alpha (alpha = 0 is every converted run's step 0)
    Variant("gqa-uptrained-alpha025", 2, "GQA uptrained (alpha 0.025)", "#ff9896", "convert", "mha", "mean", alpha=0.025),
    Variant("gqa-uptrained-alpha10", 2, "GQA uptrained (alpha 0.1)", "#c49c94", "convert", "mha", "mean", alpha=0.1),
)}


def get(key: str) -> Variant:
    """The variant ``key``, or a clear error naming the closest one."""
    if key not in VARIANTS:
        close = difflib.get_close_matches(key, list(VARIANTS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SettingsError(f"unknown attention variant {key!r}{hint}: choose from {', '.join(VARIANTS)} (nblib.attention)")
    return VARIANTS[key]


def of_run(name: str) -> Variant | None:
    """The variant whose folder is ``name`` (``pretrain-gqa`` -> gqa), or ``None`` for another name."""
    return VARIANTS.get(name.removeprefix("pretrain-")) if name.startswith("pretrain-") else None


def scratch_key(n_kv_head: int, n_head: int) -> str | None:
    """The scratch variant with these heads (MHA when they are equal), or ``None``."""
    if n_kv_head == n_head:
        return BASELINE
    return next((v.key for v in VARIANTS.values()
                 if not v.converted and v.match == "width" and v.n_kv_head == n_kv_head), None)


def rank(key: str) -> int:
    """Report order: the table's (scratch by falling KV heads, then the converted ones); others last."""
    return list(VARIANTS).index(key) if key in VARIANTS else len(VARIANTS)
