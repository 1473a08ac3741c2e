"""The machine a stage runs on: device, compute dtype, mixed-precision policy, peak FLOPs, peak
memory, distributed set-up and the facts every ``summary.json`` records.

Every hardware decision of the suite is made here, from one table a reader can check:

=============  ====  ====================  ======  =====================  ==========================
device         cc    compute dtype         scaler  torch.compile          bitsandbytes LLM.int8 (8-bit)
=============  ====  ====================  ======  =====================  ==========================
CPU            --    float32 (see below)   no      off                    yes (CPU kernels)
P100           6.0   refused by torch's CUDA 12.8+ builds (Kaggle's): no sm_60 kernels; on a CUDA 12.6
                     build float16, scaler, compile off (< 7.0), no 8-bit (use lora-16bit / 4-bit)
V100           7.0   float16               yes     on (best-effort)       no: use lora-16bit / 4-bit
T4             7.5   float16               yes     on (best-effort)       yes
A100           8.0   bfloat16              no      on                     yes
L4             8.9   bfloat16              no      on                     yes
H100 / H200    9.0   bfloat16              no      on                     yes
RTX PRO 6000   12.0  bfloat16              no      on                     yes
=============  ====  ====================  ======  =====================  ==========================

Rules behind the rows: bf16 where the GPU has it (compute capability 8.0+), else fp16 with a
gradient scaler (fp16's narrow range underflows small gradients); ``torch.compile``'s Triton
backend is refused by torch below compute capability 7.0 (inductor's ``GPUTooOldForTriton``) and
is best-effort below 8.0 (Triton officially supports 8.0+); bitsandbytes' int8 matmul
(LLM.int8()) needs 7.5 (its installation guide, v0.50), while its 4-bit NF4 needs 6.0.

Before any of that, the GPU must be one the installed builds have kernels for (:func:`check_build`,
run by :func:`detect`): torch's ``torch.cuda.get_arch_list()`` and, for 8/4-bit models,
bitsandbytes' CUDA library. torch 2.8+ built for CUDA 12.8 has none for sm_50/sm_60 (2.10's cu128:
sm_70 to sm_120; its cu126 build keeps sm_50 and sm_60: the CUDA support matrix of PyTorch's
RELEASE.md), and bitsandbytes 0.50's ``libbitsandbytes_cuda128.so`` carries sm_70 to sm_120 (its
``cuda126`` library has sm_60; read from the fatbins by :func:`fatbin_archs`).
On a CPU training stays in fp32: on the 2-core AMD EPYC this suite is tested on, bf16 autocast
trained at 0.18x fp32's tokens/s (smoke shape, interleaved; ``benchmarks/bench_pretrain.py``
section 6 measures it on any machine), so ``dtype="bfloat16"`` on a CPU is allowed (tests use it
as the stand-in for a GPU's autocast) but never chosen for you.

A CPU without 16-bit matmul units (x86 without AVX512-BF16/AMX, ARM without BF16) runs torch's
bf16 and fp16 GEMMs on a fallback path: at a GPT-2-small MLP shape, bf16 took 4.7x fp32's time
and fp16 201x on an AVX-512 Xeon without BF16, and 37x on an AVX2 EPYC (issue 32; ``benchmarks/bench_half.py``
prints the ratio on any machine). There a ``16bit`` base is stored
in 16 bits, the memory the comparison is about, and computed in float32 (:func:`half_compute`);
the CPU's units are read from its flags (:func:`cpu_half_units`), so the choice is the same on
every run of one machine.

Peak FLOP/s are dense tensor-core figures per dtype from NVIDIA's data sheets (a T4 has no bf16
units: its 65 TFLOP/s are fp16). MFU is achieved FLOP/s divided by that peak.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import resource
import struct
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TFLOPS = 1e12
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GPUSpec:
    """What the suite needs to know of one GPU model (matched by a substring of its name)."""

    key: str
    capability: tuple[int, int]
    peak_flops: dict[str, float]  # dtype name -> dense FLOP/s
    memory_bandwidth: float  # bytes/s (spec sheet), for decode MBU


_A100 = {"bfloat16": 312 * TFLOPS, "float16": 312 * TFLOPS, "float32": 19.5 * TFLOPS}
# Order matters: the first key found in the device name wins (the specific "H100 PCIe" before "H100").
GPUS: tuple[GPUSpec, ...] = (
    # NVIDIA's RTX PRO 6000 Blackwell Workstation Edition data sheet: 125 TFLOP/s fp32, 1792 GB/s;
    # dense fp16/bf16 tensor (fp32 accumulate) 503.8 TFLOP/s = 188 SMs x 1024 FLOP/clock x 2.617 GHz
    # boost (hmc-tech.com's spec page; the sheet states only sparse fp4). The Server Edition may clock lower.
    GPUSpec("RTX PRO 6000", (12, 0), {"bfloat16": 503.8 * TFLOPS, "float16": 503.8 * TFLOPS, "float32": 125 * TFLOPS}, 1.792e12),
    GPUSpec("H200", (9, 0), {"bfloat16": 989 * TFLOPS, "float16": 989 * TFLOPS, "float32": 67 * TFLOPS}, 4.8e12),
    GPUSpec("H100 PCIe", (9, 0), {"bfloat16": 756 * TFLOPS, "float16": 756 * TFLOPS, "float32": 51 * TFLOPS}, 2.0e12),
    GPUSpec("H100", (9, 0), {"bfloat16": 989 * TFLOPS, "float16": 989 * TFLOPS, "float32": 67 * TFLOPS}, 3.35e12),
    GPUSpec("A100-SXM4-80GB", (8, 0), _A100, 2.039e12),
    GPUSpec("A100 80GB PCIe", (8, 0), _A100, 1.935e12),
    GPUSpec("A100", (8, 0), _A100, 1.555e12),  # 40 GB
    GPUSpec("L40S", (8, 9), {"bfloat16": 362 * TFLOPS, "float16": 362 * TFLOPS, "float32": 91.6 * TFLOPS}, 0.864e12),
    GPUSpec("L40", (8, 9), {"bfloat16": 181 * TFLOPS, "float16": 181 * TFLOPS, "float32": 90.5 * TFLOPS}, 0.864e12),
    GPUSpec("L4", (8, 9), {"bfloat16": 121 * TFLOPS, "float16": 121 * TFLOPS, "float32": 30.3 * TFLOPS}, 0.3e12),
    GPUSpec("A10", (8, 6), {"bfloat16": 125 * TFLOPS, "float16": 125 * TFLOPS, "float32": 31.2 * TFLOPS}, 0.6e12),
    GPUSpec("V100", (7, 0), {"float16": 125 * TFLOPS, "float32": 15.7 * TFLOPS}, 0.9e12),
    GPUSpec("T4", (7, 5), {"float16": 65 * TFLOPS, "float32": 8.1 * TFLOPS}, 0.32e12),
    GPUSpec("P100", (6, 0), {"float16": 18.7 * TFLOPS, "float32": 9.3 * TFLOPS}, 0.732e12),
)
COMPILE_MIN_CAPABILITY = (7, 0)  # Triton
INT8_MIN_CAPABILITY = (7, 5)  # bitsandbytes LLM.int8()
BF16_MIN_CAPABILITY = (8, 0)
# torch's CUDA 12.6 x86 wheels (PyTorch RELEASE.md support matrix, 2.9 to 2.11; torch.cuda's
# PYTORCH_RELEASES_CODE_CC): the build to name for a GPU newer builds have no kernels for
CU126_ARCHS = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")


class HardwareError(RuntimeError):
    """A GPU this installation cannot run a stage on (no kernels for it, or a feature it lacks);
    the message names the GPU, what is missing and what to do."""


@dataclass(frozen=True)
class Device:
    """One device as the rules see it; :func:`detect` reads it, tests build fakes of it."""

    type: str  # "cpu" | "cuda"
    name: str
    capability: tuple[int, int] | None = None
    memory_bytes: int | None = None
    count: int = 1  # visible GPUs of this kind
    index: int = 0
    half_units: tuple[str, ...] = ()  # a CPU's 16-bit matmul units (:func:`cpu_half_units`); a GPU's follow its capability

    @property
    def torch(self) -> torch.device:
        return torch.device(self.type, self.index) if self.type == "cuda" else torch.device("cpu")

    @property
    def spec(self) -> GPUSpec | None:
        """The table row of this GPU, or ``None`` (CPU, unknown GPU)."""
        if self.type != "cuda":
            return None
        return next((g for g in GPUS if g.key in self.name), None)


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU flags (Linux /proc/cpuinfo: x86 "flags", ARM "Features") of units that multiply 16-bit
# matrices natively; without one, torch's CPU GEMM in that type takes a slow fallback path
CPU_HALF_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16", "bf16"), "float16": ("avx512_fp16", "amx_fp16")}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_half_units(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """The 16-bit dtypes this CPU (or one with ``flags``) has matmul units for: ``bfloat16``, ``float16``."""
    flags = cpu_flags() if flags is None else flags
    return tuple(dtype for dtype, names in CPU_HALF_FLAGS.items() if flags & set(names))


def detect(preference: str = "auto", local_rank: int = 0) -> Device:
    """The device to run on: ``auto`` is the CUDA GPU ``local_rank`` when there is one, else the CPU.

    A GPU the installed torch has no kernels for is refused here (:func:`check_build`): every stage
    finds its device through this function, so none can start work its first CUDA operation would end.
    """
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {preference!r}")
    if preference == "cpu" or not torch.cuda.is_available():
        if preference == "cuda":
            raise HardwareError("device='cuda' was asked for but torch sees no CUDA GPU; use device='auto' or 'cpu'")
        return Device("cpu", cpu_name(), half_units=cpu_half_units())
    props = torch.cuda.get_device_properties(local_rank)
    device = Device("cuda", props.name, (props.major, props.minor), props.total_memory, torch.cuda.device_count(), local_rank)
    check_build(device)
    return device


# ---------------------------------------------------------------------------------------------
# kernels: does the installed software carry code for this GPU?


def runs_on(code: str, capability: tuple[int, int]) -> bool:
    """Whether compiled GPU code ``code`` runs on a GPU of ``capability``, ``code`` named as
    ``torch.cuda.get_arch_list()`` names it: ``sm_86`` machine code runs on its own major version
    from its minor up (sm_80 code on an 8.6); ``compute_90`` PTX is compiled at load time for that
    capability or any newer one; ``a`` (arch-specific) code runs on its own capability only."""
    match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", code)
    if not match:
        return False
    kind, major, minor, suffix = match[1], int(match[2]), int(match[3]), match[4]
    if suffix == "a":
        return capability == (major, minor)
    if kind == "compute" and not suffix:
        return capability >= (major, minor)
    return capability[0] == major and capability >= (major, minor)


def check_kernels(
    device: Device,
    torch_archs: Sequence[str],
    torch_version: str,
    cuda_version: str | None,
    bnb_archs: Sequence[str] = (),
    bnb_library: str = "",
) -> None:
    """Raise :class:`HardwareError` when none of torch's compiled ``torch_archs`` runs on ``device``,
    or, given the code in bitsandbytes' library (``bnb_archs``), none of that. A list naming no CUDA
    code (a ROCm or CPU build) gives nothing to judge by and passes."""
    cap = device.capability
    if device.type != "cuda" or cap is None:
        return
    sm = f"sm_{cap[0]}{cap[1]}"
    gpu = f"{device.name} (compute capability {cap[0]}.{cap[1]}, {sm})"

    def lacks(archs: Sequence[str]) -> bool:
        codes = [a for a in archs if re.fullmatch(r"(sm|compute)_\d+[af]?", a)]
        return bool(codes) and not any(runs_on(a, cap) for a in codes)

    if lacks(torch_archs):
        fix = "pick Kaggle's \"GPU T4 x2\" accelerator"
        if cuda_version != "12.6" and any(runs_on(a, cap) for a in CU126_ARCHS):
            fix += (f", or install a torch built for CUDA 12.6, which has {sm} kernels: pip install "
                    f"torch=={torch_version.split('+')[0]} --index-url https://download.pytorch.org/whl/cu126")
        raise HardwareError(
            f"{gpu} cannot run this torch: torch {torch_version} (CUDA {cuda_version}) has GPU kernels for "
            f"{' '.join(torch_archs)} only, so its first CUDA operation would fail. Fix: {fix}"
        )
    if lacks(bnb_archs):
        raise HardwareError(
            f"{gpu} cannot run 8-bit or 4-bit base models: bitsandbytes' {bnb_library} has GPU kernels for "
            f"{' '.join(bnb_archs)} only. Use variant 'lora-16bit', 'lora-32bit' or 'full' on this GPU, or pick "
            "Kaggle's \"GPU T4 x2\" accelerator"
        )


FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


@lru_cache(maxsize=None)
def fatbin_archs(library: Path) -> tuple[str, ...]:
    """The GPU code a CUDA library carries (``sm_75`` machine code, ``compute_120`` PTX), read from
    its fatbin headers as ``cuobjdump --list-elf --list-ptx`` lists them: each fatbin is a 16-byte
    header (magic, version, header size, payload size) then entries whose headers hold their kind
    (1 PTX, 2 machine code), sizes and, at byte 28, the architecture."""
    data, archs = library.read_bytes(), set()
    start = data.find(FATBIN_MAGIC)
    while start >= 0:
        header, size = struct.unpack_from("<HQ", data, start + 6)
        at, end = start + header, start + header + size
        while at + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, at)
            if not entry_header:
                break
            archs.add(f"{'compute' if kind == 1 else 'sm'}_{struct.unpack_from('<I', data, at + 28)[0]}")
            at += entry_header + payload
        start = data.find(FATBIN_MAGIC, max(end, start + 4))
    return tuple(sorted(archs, key=lambda a: (int(a.split("_")[1]), a.startswith("compute"))))


def bitsandbytes_library() -> Path | None:
    """The CUDA library bitsandbytes will load with this torch, found without importing it (that
    loads the library): ``BNB_CUDA_VERSION`` if set, else torch's CUDA version, else the closest of
    the same major version (as bitsandbytes' ``get_cuda_bnb_library_path`` picks); ``None`` without one."""
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or not spec.submodule_search_locations or not torch.version.cuda:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    libraries = {(int(m[1][:-1]), int(m[1][-1])): p for p in folder.glob("libbitsandbytes_cuda*")
                 if (m := re.fullmatch(r"libbitsandbytes_cuda(\d+)\.(so|dll|dylib)", p.name))}
    wanted = os.environ.get("BNB_CUDA_VERSION")
    major, minor = (int(wanted[:-1]), int(wanted[-1])) if wanted else tuple(int(v) for v in torch.version.cuda.split(".")[:2])
    same = sorted(v for v in libraries if v[0] == major)
    if (major, minor) in libraries or wanted:
        return libraries.get((major, minor))
    lower = [v for v in same if v < (major, minor)]
    return libraries[lower[-1] if lower else same[0]] if same else None


def check_build(device: Device, quantized_bits: int | None = None) -> None:
    """Refuse a GPU the installed torch has no kernels for (:func:`check_kernels`); for an 8- or
    4-bit base model (``quantized_bits``) also one bitsandbytes' CUDA library lacks, and, for 8-bit,
    one below LLM.int8()'s compute capability 7.5 (:func:`check_8bit`)."""
    if device.type != "cuda":
        return
    library = bitsandbytes_library() if quantized_bits else None
    check_kernels(device, torch.cuda.get_arch_list(), torch.__version__, torch.version.cuda,
                  fatbin_archs(library) if library else (), library.name if library else "")
    if quantized_bits == 8:
        check_8bit(device)


# ---------------------------------------------------------------------------------------------
# precision policy


@dataclass(frozen=True)
class Policy:
    """How a stage computes on ``device``: dtype, autocast, grad scaler, compile, and why."""

    device: Device
    dtype: torch.dtype
    compile: bool
    notes: tuple[str, ...] = field(default=())

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32

    @property
    def scaler(self) -> bool:
        """fp16 needs loss scaling; bf16 and fp32 do not."""
        return self.dtype == torch.float16

    def autocast_context(self) -> AbstractContextManager:
        """``torch.autocast`` in the policy's dtype, or a no-op in fp32."""
        return torch.autocast(self.device.type, dtype=self.dtype) if self.autocast else nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is active only under fp16 (a disabled one passes calls through)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.scaler)

    @property
    def peak_flops(self) -> float | None:
        """Dense peak FLOP/s of one device in the policy's dtype, or ``None`` (CPU, unknown GPU)."""
        spec = self.device.spec
        return spec.peak_flops.get(self.dtype_name) if spec else None

    def mfu(self, flops_per_token: float, tokens_per_s: float | None, world_size: int = 1) -> float | None:
        """Model FLOPs utilisation: achieved FLOP/s over the peak of every device used."""
        peak = self.peak_flops
        if not peak or not tokens_per_s:
            return None
        return flops_per_token * tokens_per_s / (peak * world_size)


def auto_dtype(device: Device) -> torch.dtype:
    """The table's compute dtype: fp32 on CPU, bf16 from compute capability 8.0, else fp16."""
    if device.type != "cuda":
        return torch.float32
    cap = device.capability or (0, 0)
    return torch.bfloat16 if cap >= BF16_MIN_CAPABILITY else torch.float16


def policy(dtype: str = "auto", compile: bool = False, device: Device | None = None) -> Policy:
    """The precision policy for ``device`` (default: :func:`detect`).

    ``dtype`` is ``auto`` (the table) or a name in :data:`DTYPES`; a GPU without bf16 asked for
    bf16 is an error naming fp16. ``compile`` is switched off below compute capability 7.0, with
    a note saying so.
    """
    device = device or detect()
    notes: list[str] = []
    if dtype == "auto":
        chosen = auto_dtype(device)
    elif dtype in DTYPES:
        chosen = DTYPES[dtype]
        cap = device.capability or (0, 0)
        if device.type == "cuda" and chosen == torch.bfloat16 and cap < BF16_MIN_CAPABILITY:
            raise HardwareError(
                f"dtype 'bfloat16' needs compute capability 8.0 (A100, L4, H100); {device.name} has "
                f"{cap[0]}.{cap[1]}: use dtype 'float16' (with loss scaling) or 'auto'"
            )
    else:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.type == "cpu" and chosen != torch.float32 and str(chosen).removeprefix("torch.") not in device.half_units:
        notes.append(f"{device.name} has no {str(chosen).removeprefix('torch.')} matmul units: expect several times "
                     "float32's step time (benchmarks/bench_half.py measures it)")
    use_compile = bool(compile)
    if use_compile and device.type == "cuda" and (device.capability or (0, 0)) < COMPILE_MIN_CAPABILITY:
        use_compile = False
        notes.append(
            f"torch.compile is off: {device.name} has compute capability "
            f"{device.capability[0]}.{device.capability[1]} and Triton needs 7.0"
        )
    return Policy(device, chosen, use_compile, tuple(notes))


def half_dtype(device: Device | None = None) -> torch.dtype:
    """The 16-bit type a model is stored in for ``16bit`` variants: bf16 where the device has it
    (a GPU from compute capability 8.0; a CPU unless it has fp16 units alone), else fp16."""
    device = device or detect()
    if device.type == "cuda":
        return auto_dtype(device)
    return torch.float16 if device.half_units == ("float16",) else torch.bfloat16


def half_compute(device: Device | None = None) -> torch.dtype:
    """What a ``16bit`` base computes in: its 16-bit type where the device multiplies it natively
    (every GPU; a CPU with units for it), else float32 (stored in 16 bits, read as float32 at use)."""
    device = device or detect()
    half = half_dtype(device)
    if device.type == "cuda" or str(half).removeprefix("torch.") in device.half_units:
        return half
    return torch.float32


def check_8bit(device: Device | None = None) -> None:
    """Refuse bitsandbytes' 8-bit matmul on a GPU it cannot serve, naming what to use instead."""
    device = device or detect()
    cap = device.capability
    if device.type == "cuda" and cap is not None and cap < INT8_MIN_CAPABILITY:
        raise HardwareError(
            f"8-bit base models need bitsandbytes' LLM.int8(), which needs compute capability 7.5 (T4 or newer); "
            f"{device.name} has {cap[0]}.{cap[1]}. Use variant 'lora-16bit' (or 'lora-4bit', NF4 needs 6.0) on "
            "this GPU, or pick Kaggle's 'GPU T4 x2' accelerator"
        )


# ---------------------------------------------------------------------------------------------
# measurement


def sync(device: torch.device | Device) -> None:
    """Wait for queued GPU work (timings must include it); a no-op on CPU."""
    dev = device.torch if isinstance(device, Device) else device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak_memory(device: torch.device | Device | str = "cpu") -> None:
    """Start a measured phase: reset CUDA's peak allocation, or on Linux this process's peak
    resident set size (``/proc/self/clear_refs``), so :func:`peak_memory` covers only what follows."""
    dev = torch.device(device.torch if isinstance(device, Device) else device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device | Device | str = "cpu") -> int:
    """Peak bytes since the last :func:`reset_peak_memory`: CUDA's peak allocation on a GPU, the
    process's peak resident set size (VmHWM) on a CPU (its lifetime peak where VmHWM cannot be read)."""
    dev = torch.device(device.torch if isinstance(device, Device) else device)
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def info(device: Device | None = None) -> dict[str, Any]:
    """Where a number was measured: CPU model, cores and load (1-minute average: a shared machine's
    timings swing with it), GPU model and count, library versions."""
    device = device or detect()
    out: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "cpu_half_units": list(cpu_half_units()),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "gpu": None,
        "device": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        out.update(gpu=device.name, gpu_count=device.count, capability=list(device.capability or ()))
    return out


# ---------------------------------------------------------------------------------------------
# distributed


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) DDP job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def agree(self, value: int, device: torch.device) -> int:
        """Rank 0's ``value`` (an int), shared with every process."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], device=device, dtype=torch.long)
        dist.broadcast(t, src=0)
        return int(t.item())

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def rank() -> int:
    """This process's rank in the job ``torchrun`` started (0 when alone), before or without joining it."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its machine under ``torchrun`` (its GPU), 0 when alone."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def distributed() -> Dist:
    """Join the DDP job ``torchrun`` describes in the environment (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), local_rank(), dist.get_world_size(), owns)
