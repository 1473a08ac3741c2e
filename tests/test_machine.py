"""nblib.machine: the hardware rules, driven by faked devices, and mixed precision exercised on CPU."""
from __future__ import annotations

import math
import mmap

import pytest
import torch

from nblib import machine
from nblib.machine import Device

GIB = 2**30
# torch.cuda.get_arch_list() of torch 2.10.0+cu128, Kaggle's: the 12.8 row of PyTorch RELEASE.md's
# CUDA support matrix for 2.9 and 2.10 (Volta to Blackwell, no +PTX); its cu126 row keeps sm_50/sm_60
KAGGLE_TORCH = ("2.10.0+cu128", "12.8", ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])
CU126_TORCH = ("2.10.0+cu126", "12.6", ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"])
DEVICES = {
    "CPU": Device("cpu", "Intel Xeon"),
    "T4": Device("cuda", "Tesla T4", (7, 5), 15 * GIB, 2),
    "P100": Device("cuda", "Tesla P100-PCIE-16GB", (6, 0), 16 * GIB),
    "L4": Device("cuda", "NVIDIA L4", (8, 9), 22 * GIB),
    "A100": Device("cuda", "NVIDIA A100-SXM4-40GB", (8, 0), 40 * GIB),
    "H100": Device("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB),
    "RTX PRO 6000": Device("cuda", "NVIDIA RTX PRO 6000 Blackwell Server Edition", (12, 0), 96 * GIB),
}
# device -> (compute dtype, grad scaler, compile kept, dense peak TFLOP/s in that dtype, 8-bit allowed)
RULES = {
    "CPU": (torch.float32, False, True, None, True),
    "T4": (torch.float16, True, True, 65, True),
    "P100": (torch.float16, True, False, 18.7, False),
    "L4": (torch.bfloat16, False, True, 121, True),
    "A100": (torch.bfloat16, False, True, 312, True),
    "H100": (torch.bfloat16, False, True, 989, True),
    "RTX PRO 6000": (torch.bfloat16, False, True, 503.8, True),
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
        with pytest.raises(machine.HardwareError, match="lora-16bit"):
            machine.check_8bit(device)
    if not compiled:
        assert any("Triton needs 7.0" in n for n in p.notes)


def test_a_gpu_without_kernels_in_the_torch_build_is_refused():
    """Kaggle's torch (cu128) has no sm_60: the P100 is refused naming the GPU, the build and both
    fixes; every GPU it has code for passes; the cu126 build takes the P100."""
    version, cuda, archs = KAGGLE_TORCH
    with pytest.raises(machine.HardwareError) as refused:
        machine.check_kernels(DEVICES["P100"], archs, version, cuda)
    message = str(refused.value)
    assert message.startswith("Tesla P100-PCIE-16GB (compute capability 6.0, sm_60) cannot run this torch: torch "
                              "2.10.0+cu128 (CUDA 12.8) has GPU kernels for sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120 only")
    assert "\"GPU T4 x2\"" in message
    assert "pip install torch==2.10.0 --index-url https://download.pytorch.org/whl/cu126" in message
    for name in ("T4", "L4", "A100", "H100", "RTX PRO 6000", "CPU"):
        machine.check_kernels(DEVICES[name], archs, version, cuda)
    machine.check_kernels(DEVICES["P100"], CU126_TORCH[2], *CU126_TORCH[:2])
    with pytest.raises(machine.HardwareError, match="GPU T4 x2\" accelerator$"):  # already cu126: no pip line to give
        machine.check_kernels(Device("cuda", "Tesla K80", (3, 7)), CU126_TORCH[2], *CU126_TORCH[:2])
    machine.check_kernels(DEVICES["CPU"], [], "2.13.0+cpu", None)
    machine.check_kernels(DEVICES["A100"], ["gfx90a"], "2.10.0+rocm6.4", None)  # ROCm names: nothing to judge by


@pytest.mark.parametrize("code, capability, runs", [
    ("sm_80", (8, 6), True), ("sm_86", (8, 0), False), ("sm_90", (10, 0), False), ("sm_75", (7, 5), True),
    ("compute_90", (12, 0), True), ("compute_90", (8, 9), False), ("sm_90a", (9, 0), True), ("compute_90a", (10, 0), False),
    ("sm_100f", (10, 3), True), ("gfx90a", (9, 0), False),
])
def test_which_compiled_code_runs_on_which_gpu(code, capability, runs):
    assert machine.runs_on(code, capability) is runs


def test_bitsandbytes_libraries_and_the_quantized_check(monkeypatch):
    """The fatbins of the bitsandbytes this venv has: its CUDA 12.8 library lacks sm_60, its 12.6
    one has it; a 4-bit base on a P100 under a cu126 torch passes, 8-bit is refused for LLM.int8()."""
    monkeypatch.delenv("BNB_CUDA_VERSION", raising=False)
    version, cuda, archs = CU126_TORCH
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    library = machine.bitsandbytes_library()
    assert library.name.startswith("libbitsandbytes_cuda126.")
    assert "sm_60" in machine.fatbin_archs(library)
    machine.check_build(DEVICES["P100"], 4)
    with pytest.raises(machine.HardwareError, match="LLM.int8.*lora-16bit"):
        machine.check_build(DEVICES["P100"], 8)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    cu128 = machine.bitsandbytes_library()
    assert cu128.name.startswith("libbitsandbytes_cuda128.") and "sm_60" not in machine.fatbin_archs(cu128)
    assert {"sm_75", "sm_80", "sm_90", "sm_120"} <= set(machine.fatbin_archs(cu128))
    monkeypatch.setattr(torch.version, "cuda", "12.9")  # no 12.9 library: the closest lower one of CUDA 12
    assert machine.bitsandbytes_library() == cu128
    with pytest.raises(machine.HardwareError, match=r"cannot run 8-bit or 4-bit base models: bitsandbytes' "
                                                     r"libbitsandbytes_cuda128\.so has GPU kernels for sm_70 .* only"):
        machine.check_build(DEVICES["P100"], 4)  # a torch with sm_60 (faked) and bitsandbytes' 12.8 library


def test_t4_peak_is_fp16_and_has_no_bf16():
    t4 = DEVICES["T4"]
    assert t4.spec.peak_flops["float16"] == 65e12 and "bfloat16" not in t4.spec.peak_flops
    with pytest.raises(machine.HardwareError, match="use dtype 'float16'"):
        machine.policy("bfloat16", device=t4)
    assert machine.half_dtype(t4) == torch.float16 and machine.half_dtype(DEVICES["A100"]) == torch.bfloat16
    assert machine.policy("float32", device=t4).dtype == torch.float32  # asked for: kept
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
        machine.policy("fp8", device=t4)


# CPU flags -> (16-bit units read, 16-bit variant's storage dtype, its compute dtype)
CPU_FLAGS = {
    "AVX2 only (this suite's CI)": ({"avx", "avx2"}, (), torch.bfloat16, torch.float32),
    "AVX-512 without BF16": ({"avx2", "avx512f", "avx512_vnni"}, (), torch.bfloat16, torch.float32),
    "Cooper Lake (AVX512-BF16)": ({"avx512f", "avx512_bf16"}, ("bfloat16",), torch.bfloat16, torch.bfloat16),
    "Sapphire Rapids (AMX, AVX512-FP16)": ({"amx_bf16", "avx512_fp16", "amx_fp16"}, ("bfloat16", "float16"),
                                           torch.bfloat16, torch.bfloat16),
    "fp16 units alone": ({"avx512_fp16"}, ("float16",), torch.float16, torch.float16),
    "ARM with BF16 (Graviton 3)": ({"asimd", "bf16", "i8mm"}, ("bfloat16",), torch.bfloat16, torch.bfloat16),
    "no /proc/cpuinfo (macOS)": (set(), (), torch.bfloat16, torch.float32),
}


@pytest.mark.parametrize("name", list(CPU_FLAGS))
def test_a_cpu_computes_16bit_only_where_it_has_units_for_it(name, monkeypatch):
    flags, units, stored, computed = CPU_FLAGS[name]
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset(flags))
    cpu = machine.detect("cpu")
    assert cpu.half_units == units == machine.cpu_half_units(frozenset(flags)) and machine.info(cpu)["cpu_half_units"] == list(units)
    assert machine.half_dtype(cpu) == stored and machine.half_compute(cpu) == computed
    slow = [n for n in machine.policy("bfloat16", device=cpu).notes if "no bfloat16 matmul units" in n]
    assert bool(slow) is ("bfloat16" not in units)
    assert machine.policy("auto", device=cpu).dtype == torch.float32  # pretraining stays in fp32 on any CPU


@pytest.mark.parametrize("name", ["T4", "P100", "A100", "H100"])
def test_a_gpu_computes_16bit_in_its_own_16bit_type(name):
    device = DEVICES[name]
    assert machine.half_compute(device) == machine.half_dtype(device) == machine.auto_dtype(device)


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
