"""nblib.machine: the hardware rules, driven by faked devices, and mixed precision exercised on CPU."""
from __future__ import annotations

import math
import mmap

import pytest
import torch

from nblib import machine
from nblib.machine import Device

GIB = 2**30
DEVICES = {
    "CPU": Device("cpu", "Intel Xeon"),
    "T4": Device("cuda", "Tesla T4", (7, 5), 15 * GIB, 2),
    "P100": Device("cuda", "Tesla P100-PCIE-16GB", (6, 0), 16 * GIB),
    "L4": Device("cuda", "NVIDIA L4", (8, 9), 22 * GIB),
    "A100": Device("cuda", "NVIDIA A100-SXM4-40GB", (8, 0), 40 * GIB),
    "H100": Device("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB),
}
# device -> (compute dtype, grad scaler, compile kept, dense peak TFLOP/s in that dtype, 8-bit allowed)
RULES = {
    "CPU": (torch.float32, False, True, None, True),
    "T4": (torch.float16, True, True, 65, True),
    "P100": (torch.float16, True, False, 18.7, False),
    "L4": (torch.bfloat16, False, True, 121, True),
    "A100": (torch.bfloat16, False, True, 312, True),
    "H100": (torch.bfloat16, False, True, 989, True),
}


@pytest.mark.parametrize("name", list(DEVICES))
def test_hardware_rules(name):
    device = DEVICES[name]
    dtype, scaler, compiled, peak, int8 = RULES[name]
    p = machine.policy("auto", compile=True, device=device)
    assert p.dtype == dtype and p.scaler is scaler and p.autocast is (dtype != torch.float32)
    assert p.compile is (compiled and device.type == "cuda" or device.type == "cpu")
    assert (p.peak_flops / 1e12 if p.peak_flops else None) == pytest.approx(peak) if peak else p.peak_flops is None
    if peak:  # MFU: 6N FLOPs/token x tokens/s over the peak of every GPU used
        assert p.mfu(1e9, 1e4, world_size=2) == pytest.approx(1e13 / (2 * peak * 1e12))
    else:
        assert p.mfu(1e9, 1e4) is None
    if int8:
        machine.check_8bit(device)
    else:
        with pytest.raises(RuntimeError, match="lora-16bit"):
            machine.check_8bit(device)
    if not compiled:
        assert any("Triton needs 7.0" in n for n in p.notes)


def test_t4_peak_is_fp16_and_has_no_bf16():
    t4 = DEVICES["T4"]
    assert t4.spec.peak_flops["float16"] == 65e12 and "bfloat16" not in t4.spec.peak_flops
    with pytest.raises(ValueError, match="use dtype 'float16'"):
        machine.policy("bfloat16", device=t4)
    assert machine.half_dtype(t4) == torch.float16 and machine.half_dtype(DEVICES["A100"]) == torch.bfloat16
    assert machine.policy("float32", device=t4).dtype == torch.float32  # asked for: kept
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
        machine.policy("fp8", device=t4)


def test_detect_on_this_machine_and_info():
    d = machine.detect()
    assert d.type == ("cuda" if torch.cuda.is_available() else "cpu")
    info = machine.info(d)
    assert info["cpu"] and info["cpu_cores"] >= 1 and info["torch"] == torch.__version__
    with pytest.raises(ValueError, match="device must be"):
        machine.detect("tpu")


def test_peak_memory_is_reset_per_phase():
    machine.reset_peak_memory("cpu")
    before = machine.peak_memory("cpu")
    # 64 MiB of fresh pages, touched: an anonymous mapping, so malloc cannot hand back memory that
    # earlier tests freed and is still resident (that would not raise the resident peak)
    big = mmap.mmap(-1, 64 * 2**20)
    big.write(b"\x01" * len(big))
    during = machine.peak_memory("cpu")
    big.close()
    machine.reset_peak_memory("cpu")
    after = machine.peak_memory("cpu")
    assert during - before >= 48 * 2**20 and after < during


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_training_runs_on_cpu(dtype):
    """CPU autocast stands in for a GPU's: the fp16 path uses a real (CPU) grad scaler."""
    p = machine.policy(dtype, device=DEVICES["CPU"])
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = p.grad_scaler()
    assert scaler.is_enabled() is (dtype == "float16")
    with p.autocast_context():
        out = model(torch.randn(4, 8))
    assert out.dtype == getattr(torch, dtype)
    scaler.scale(out.float().pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert all(math.isfinite(v) for v in model.weight.flatten().tolist())
