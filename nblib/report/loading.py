"""Reading the runs a comparison needs, and refusing pairs that are not matched.

A *group* is one variant (``runs/<name>/``) with all its seeds (``seed-<seed>/``). Compared
groups must differ only in what is compared: pretraining variants in ``n_kv_head`` and
``uptrain_fraction`` (a variant converted from MHA also starts from its weights and takes fewer
steps; neither is a setting), fine-tune
variants in their variant (precision, LoRA) and learning rate. Everything else — settings
(except the stage's ``free`` keys), the data trained on (sha256 and token counts) and the set of
seeds — must agree, and so must the seeds of one group among themselves. A pair that does not is
refused with both runs and the differing keys named, or with ``allow_mismatch`` kept and flagged.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from nblib import attention, config, runs

REQUIRED = tuple(attention.VARIANTS[k].folder for k in attention.REQUIRED)
VARIED = {"pretrain": frozenset({"n_kv_head", "uptrain_fraction"}), "finetune": frozenset({"variant", "learning_rate"})}
PROFILE_STAGE = {"pretrain": "train", "finetune": "finetune"}


class MissingRunError(runs.RunError):
    """A run the comparison needs is absent or unfinished; the message names the notebook to run."""


class MismatchError(ValueError):
    """Two compared runs differ in more than the compared keys."""


@dataclass(frozen=True)
class Run:
    """One finished seed of a variant: its folder, summary and metrics rows."""

    folder: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def seed(self) -> int:
        return self.summary["seed"]

    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.metrics if r["kind"] == "eval"]


@dataclass
class Group:
    """A variant with all its seeds (sorted by seed)."""

    name: str
    runs: list[Run]

    @property
    def summary(self) -> dict[str, Any]:
        """The first seed's summary (what the seeds share: shapes, settings, label)."""
        return self.runs[0].summary

    @property
    def stage(self) -> str:
        return self.summary["stage"]

    @property
    def label(self) -> str:
        return self.summary["label"]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    def values(self, key: str) -> list[Any]:
        """``summary[key]`` of every seed."""
        return [r.summary[key] for r in self.runs]


@dataclass
class Comparison:
    """The groups to compare, in report order, and the mismatches kept by ``allow_mismatch``."""

    groups: dict[str, Group]
    mismatches: list[str] = field(default_factory=list)

    def stage(self, stage: str) -> dict[str, Group]:
        """The groups of one stage keyed by label (``MHA``, ``GQA``, ``LoRA + 8-bit``, ...)."""
        return {g.label: g for g in self.groups.values() if g.stage == stage}

    @property
    def pretrain(self) -> dict[str, Group]:
        return self.stage("pretrain")

    @property
    def finetune(self) -> dict[str, Group]:
        return self.stage("finetune")


def _group_names(runs_dir: Path) -> list[str]:
    return sorted({p.parent.name for p in runs_dir.glob("*/seed-*")}) if runs_dir.is_dir() else []


def load_group(name: str, root: str | Path | None = None) -> Group:
    """Every seed of ``runs/<name>``; a missing or unfinished seed raises naming its notebook."""
    base = config.paths(root).runs / name
    folders = sorted(p for p in base.glob("seed-*") if p.is_dir())
    if not any((f / "summary.json").is_file() for f in folders):
        raise MissingRunError(f"runs/{name}/seed-*/summary.json not found: run notebook {runs.producer(name)} first "
                              f"(it writes runs/{name}/seed-<seed>/)")
    group = []
    for folder in folders:
        summary = runs.read_summary(folder)
        _check_finished(summary, config.relative(folder, config.paths(root).home), name)
        group.append(Run(folder, summary, runs.read_metrics(folder)))
    return Group(name, sorted(group, key=lambda r: r.seed))


def _check_finished(summary: dict[str, Any], where: str, name: str) -> None:
    """Raise :class:`MissingRunError` for a seed that diverged (stopped so, or finished with results that are not
    finite, as runs written before nblib stopped at a blow-up did) or that has not finished."""
    blown = sorted(k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v))
    if summary["stop_reason"] == "diverged" or blown:
        how = ", ".join(blown) + " not finite" if blown else f"at step {summary.get('diverged_step')}"
        afresh = runs.afresh(name) if summary["stage"] == "pretrain" else "resume=False"
        raise MissingRunError(f"{where} diverged ({how}): re-run notebook {runs.producer(name)} with a lower "
                              f"learning_rate and {afresh}")
    if not summary["finished"]:
        raise MissingRunError(
            f"{where} is not finished (summary.json has finished=false): re-run notebook {runs.producer(name)}, "
            "which resumes from its last checkpoint, and compare when it has finished"
        )


def _order(group: Group) -> tuple:
    """Pretraining before fine-tuning; attention variants in ``nblib.attention``'s order (others
    after them by falling KV heads); fine-tune variants by base precision (4, 8, 16, 32 bits), LoRA
    before full."""
    s = group.summary
    if group.stage == "pretrain":
        return (0, attention.rank(s["variant"]), -s["n_kv_head"], group.name)
    return (1, not s["lora"], int(s["mode"].removesuffix("bit")), group.name)


def load(names: Iterable[str] | None = None, root: str | Path | None = None, allow_mismatch: bool = False) -> Comparison:
    """Read the named variant folders, or every one under ``runs/`` when ``names`` is ``None``.

    Without names, ``pretrain-mha`` and ``pretrain-gqa`` (``nblib.attention.REQUIRED``) are required and other unfinished runs
    are left out with a warning; with names, every named run is required. Any pretraining variant
    besides MHA needs ``pretrain-mha`` as its baseline. Pairs that are not matched raise
    :class:`MismatchError` unless ``allow_mismatch``.
    """
    runs_dir = config.paths(root).runs
    if names is None:
        groups = {n: load_group(n, root) for n in REQUIRED}
        for name in _group_names(runs_dir):
            if name in groups:
                continue
            try:
                groups[name] = load_group(name, root)
            except MissingRunError as e:
                warnings.warn(f"{e}; it is left out of the comparison", stacklevel=2)
    else:
        names = list(dict.fromkeys(names))
        if not names:
            raise ValueError("`runs` is an empty list: name at least one run, or pass None to read every run")
        groups = {n: load_group(n, root) for n in names}
    pretrain = [g for g in groups.values() if g.stage == "pretrain"]
    if pretrain and not any(g.summary["variant"] == "mha" for g in pretrain):
        raise MissingRunError(
            f"pretraining runs {', '.join(g.name for g in pretrain)} are compared against MHA: "
            f"add pretrain-mha to `runs` (notebook {runs.producer('pretrain-mha')} writes it)"
        )
    labels: dict[str, str] = {}
    for g in groups.values():
        if g.label in labels:
            raise ValueError(f"runs {labels[g.label]} and {g.name} are both {g.label}: name the one to compare in `runs`")
        labels[g.label] = g.name
    comparison = Comparison({g.name: g for g in sorted(groups.values(), key=_order)})
    problems = mismatches(comparison)
    if problems and not allow_mismatch:
        raise MismatchError("; ".join(problems) + ". Compare matched runs, or pass allow_mismatch=True to "
                            "compare them anyway (the report flags them in red)")
    comparison.mismatches = problems
    return comparison


def differences(a: dict[str, Any], b: dict[str, Any], ignore: Iterable[str]) -> list[str]:
    """Keys of settings, data and seed set where run summaries ``a`` and ``b`` differ."""
    ignore = set(ignore)
    keys = sorted(k for k in set(a["config"]) | set(b["config"]) if k not in ignore and a["config"].get(k) != b["config"].get(k))
    keys += [f"data.{k}" for k in sorted(set(a["data"]) | set(b["data"])) if a["data"].get(k) != b["data"].get(k)]
    return keys


def pairs(comparison: Comparison) -> list[tuple[Group, Group]]:
    """``(baseline, variant)`` pairs the report compares: each pretraining variant with MHA, each
    fine-tune variant with the baselines its summary names."""
    out = []
    pre = comparison.pretrain
    if "MHA" in pre:
        out += [(pre["MHA"], g) for label, g in pre.items() if label != "MHA"]
    ft = {g.summary["variant"]: g for g in comparison.finetune.values()}
    for g in ft.values():
        out += [(ft[b], g) for b in g.summary["baselines"] if b in ft]
    return out


def mismatches(comparison: Comparison) -> list[str]:
    """Every unmatched pair (and every group whose seeds disagree), in words."""
    problems = []
    for g in comparison.groups.values():
        free = config.free_keys(PROFILE_STAGE[g.stage]) | {"seed", "seeds"}
        for run in g.runs[1:]:
            diff = differences(g.summary, run.summary, free)
            if diff:
                problems.append(f"{g.runs[0].summary['folder']} and {run.summary['folder']} (seeds of one variant) "
                                f"differ in {', '.join(diff)}")
    for base, other in pairs(comparison):
        free = config.free_keys(PROFILE_STAGE[base.stage]) | {"seed", "seeds"} | VARIED[base.stage]
        diff = differences(base.summary, other.summary, free)
        if base.seeds != other.seeds:
            diff.append(f"seeds ({base.seeds} vs {other.seeds})")
        if diff:
            problems.append(f"runs/{base.name} and runs/{other.name} are not a matched pair: they differ in "
                            f"{', '.join(diff)} (only {', '.join(sorted(VARIED[base.stage]))} may differ)")
    return problems
