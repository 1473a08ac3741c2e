"""nblib.measure: byte counts, the GPU bandwidth table and a tiny decode sweep (figures not asserted)."""
from __future__ import annotations

import pytest
import torch

from nblib import machine, measure
from nblib.model import GPT, GPTConfig


def tiny_variants() -> dict[str, GPTConfig]:
    return measure.attention_variants(2, 4, 32, ["mha", "gqa", "mqa"], vocab_size=97, context_length=64)


def test_variants_come_from_the_attention_registry():
    from nblib import attention
    from nblib.model import matched_d_mlp

    v = measure.attention_variants(8, 8, 512, ["mha", "gqa-params", "gqa-uptrained", "mqa"])
    assert list(v) == ["MHA", "GQA (equal params)", "MQA"]  # a converted variant has its scratch twin's shape
    assert v["GQA (equal params)"].n_kv_head == attention.VARIANTS["gqa-params"].n_kv_head
    assert v["GQA (equal params)"].d_mlp == matched_d_mlp(v["MHA"], 2) > 4 * 512 and v["MQA"].d_mlp is None
    with pytest.raises(ValueError, match="did you mean 'gqa'"):
        measure.attention_variants(8, 8, 512, ["mha", "gqa2"])


def test_variants_differ_only_in_kv_heads():
    v = tiny_variants()
    assert [c.n_kv_head for c in v.values()] == [4, 2, 1]
    assert {(c.n_layer, c.n_head, c.d_model, c.context_length, c.dropout) for c in v.values()} == {(2, 4, 32, 64, 0.0)}


def test_bytes_a_decode_step_reads():
    for tie in (True, False):
        model = GPT(GPTConfig(vocab_size=97, context_length=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32, tie_embeddings=tie))
        matmul_weights = sum(p.numel() for p in model.transformer.h.parameters()) + 2 * 32 + 97 * 32  # blocks, ln_f, lm_head
        assert measure.weight_bytes(model) == 4 * matmul_weights
        assert measure.decode_step_bytes(model, 3, 10) == 4 * matmul_weights + model.config.kv_cache_bytes(3, 10)
    half = model.to(torch.bfloat16)
    assert measure.weight_bytes(half) == 2 * matmul_weights


def test_gpu_bandwidth_table_matches_the_specific_name_first():
    def bw(name: str) -> float | None:
        spec = machine.Device("cuda", name, (8, 0)).spec
        return spec.memory_bandwidth if spec else None

    assert bw("NVIDIA H100 80GB HBM3") == 3350e9 and bw("NVIDIA H100 PCIe") == 2000e9
    assert bw("NVIDIA A100-SXM4-80GB") == 2039e9 and bw("NVIDIA A100-PCIE-40GB") == 1555e9
    assert bw("NVIDIA L40S") == 864e9 and bw("NVIDIA L4") == 300e9
    assert bw("NVIDIA A10G") == 600e9 and bw("Radeon") is None


def test_cpu_bandwidth_is_measured():
    bandwidth, source = measure.peak_bandwidth("cpu")
    assert bandwidth > 1e8 and source == "measured copy"
    assert measure.copy_bandwidth("cpu", nbytes=2**20, repeats=2) > 0


def test_interleaved_alternates_the_order():
    order: list[str] = []
    times, results = measure.interleaved({"a": lambda: order.append("a") or 1, "b": lambda: order.append("b") or 2}, 2, torch.device("cpu"))
    assert order == ["a", "b", "b", "a", "a", "b"]  # warm-up round, then two timed rounds
    assert [len(t) for t in times.values()] == [2, 2] and results == {"a": 1, "b": 2}


def test_decode_sweep_rows():
    df = measure.decode_sweep(tiny_variants(), batches=[1, 2], contexts=[16, 32], new_tokens=4, repeats=2,
                              device="cpu", bandwidth=(1e10, "given"))
    assert len(df) == 3 * 2 * 2
    assert {"variant", "batch", "context", "prefill_s", "decode_tokens_per_s", "ms_per_token", "kv_cache_bytes",
            "bytes_per_step", "bandwidth_GBps", "mbu"} <= set(df.columns)
    assert (df.prefill_s > 0).all() and (df.decode_tokens_per_s > 0).all()
    for r in df.itertuples():
        c = tiny_variants()[r.variant]
        assert r.kv_cache_bytes == c.kv_cache_bytes(r.batch, r.context)
        assert r.decode_tokens_per_s == pytest.approx(r.batch * 1e3 / r.ms_per_token)
        assert r.mbu == pytest.approx(r.bandwidth_GBps / 10)
    assert df.attrs == {"peak_bandwidth_GBps": 10.0, "bandwidth_source": "given"}
    with pytest.raises(ValueError, match="exceed new_tokens"):
        measure.decode_sweep(tiny_variants(), [1], [4], new_tokens=4, repeats=1, device="cpu", bandwidth=(1e10, "given"))


def test_compare_measurements_report_progress_like_the_training_stages(tmp_path, monkeypatch):
    """The compare stage's long measurements write the status line the pipeline shows: which, n of m, ETA."""
    from nblib import progress

    seen: list[dict] = []
    monkeypatch.setenv(progress.ENV, str(tmp_path / "status.json"))
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    real = progress.write_json
    monkeypatch.setattr(progress, "write_json", lambda path, status: (seen.append(status), real(path, status)))
    measure.decode_sweep(tiny_variants(), batches=[1, 2], contexts=[16, 32], new_tokens=4, repeats=1,
                         device="cpu", bandwidth=(1e10, "given"), desc="cost sweep tiny")
    assert [(s["desc"], s["n"], s["total"]) for s in seen][-1] == ("cost sweep tiny", 4, 4)
    assert any(s["eta_s"] is not None for s in seen) and "batch x context" == seen[-1]["unit"]
    third = next(s for s in seen if s["n"] == 3)
    assert progress.line(third).startswith("cost sweep tiny: 3/4 batch x context, batch 2, context 16, ETA ")
