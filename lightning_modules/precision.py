"""Which precision a model's matmuls run in: bfloat16 where the device multiplies it natively, float32
elsewhere.

Why a choice at all: on CPUs with bfloat16 dot-product instructions (AVX-512 BF16, AMX) and on CUDA
GPUs of compute capability 8 and up, bf16-mixed trains e5-small faster than float32 with the same dev
accuracy. Where the instructions are missing, PyTorch emulates bfloat16 and the same fit runs about
29 times slower than in float32 (a 2-core AVX2 AMD EPYC, docs/getting-started.md, "Precision"), so a
fixed ``bf16-mixed`` made the demo unfinishable on most laptops and cloud VMs. ``auto`` asks the device.

One decision serves every stage: the Trainer's ``precision: auto`` (fit, validate, test) and the sketch
pass's ``precision: auto`` (``callbacks/sketching.py``) both call :func:`native_bf16`. The decision is a
pure function of :class:`DeviceFacts`, so each capability answer is tested without the hardware.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Lightning's precision names (and their short aliases) that a Trainer accepts, besides crossling's "auto"
LIGHTNING_PRECISIONS = (
    "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
    "transformer-engine-float16", "32", "16", "bf16", "64",
)
# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) at or above which it has bfloat16 dot-product instructions
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX",
                     "AVX512_CORE_AMX", "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "DEFAULT", "ALL")
_X86_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


class PrecisionError(ValueError):
    """A precision name crossling does not know (one line, exit 2)."""


@dataclass(frozen=True)
class DeviceFacts:
    """What the precision decision looks at, gathered by :func:`device_facts`.

    Args:
        device_type: ``cpu``, ``cuda``, ``mps``, ...
        machine: ``platform.machine()`` (``x86_64``, ``aarch64``, ``arm64``).
        cpu_flags: the CPU's feature flags (``/proc/cpuinfo``'s ``flags`` on x86, ``Features`` on ARM).
        onednn_isa_cap: ``ONEDNN_MAX_CPU_ISA`` (or the older ``DNNL_MAX_CPU_ISA``) when set: oneDNN then uses
            no instruction above it, bfloat16 ones included.
        torch_mkldnn_bf16: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: whether PyTorch's oneDNN path
            takes bfloat16 matmuls at all (True from AVX-512 on, with or without the bf16 instructions;
            on ARM, the BF16 extension).
        cuda_capability: the GPU's compute capability (major, minor), for ``cuda``.
    """

    device_type: str
    machine: str = ""
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    onednn_isa_cap: str | None = None
    torch_mkldnn_bf16: bool = False
    cuda_capability: tuple[int, int] | None = None


def native_bf16(facts: DeviceFacts) -> tuple[bool, str]:
    """Whether this device multiplies bfloat16 natively, and why, in words for the log."""
    if facts.device_type == "cuda":
        if facts.cuda_capability is None:
            return False, "CUDA device of unknown compute capability"
        major, minor = facts.cuda_capability
        if major >= 8:
            return True, f"CUDA compute capability {major}.{minor} (bfloat16 tensor cores)"
        return False, f"CUDA compute capability {major}.{minor}: bfloat16 is emulated below 8.0"
    if facts.device_type != "cpu":
        return False, f"{facts.device_type} device: float32 unless asked otherwise"
    machine = facts.machine.lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        found = [flag for flag in _X86_BF16_FLAGS if flag in facts.cpu_flags]
        if not found:
            return False, "CPU without AVX-512 BF16 or AMX: bfloat16 matmuls are emulated"
        cap = (facts.onednn_isa_cap or "").upper()
        if cap and cap not in _ONEDNN_BF16_ISAS:
            return False, f"CPU with {found[0]}, but ONEDNN_MAX_CPU_ISA={facts.onednn_isa_cap} keeps oneDNN below it"
        if not facts.torch_mkldnn_bf16:
            return False, f"CPU with {found[0]}, but this torch build's oneDNN does not take bfloat16"
        return True, f"CPU with {found[0]}"
    if machine in ("aarch64", "arm64"):
        if facts.torch_mkldnn_bf16 and "bf16" in facts.cpu_flags:
            return True, "ARM CPU with the BF16 extension, taken by this torch build's oneDNN"
        return False, "ARM CPU whose bfloat16 matmuls this torch build does not run natively"
    return False, f"{facts.machine or 'unknown'} CPU: bfloat16 not known to be native"


def native_bf16_on(device_type: str) -> tuple[bool, str]:
    """:func:`native_bf16` of this machine's ``device_type``: the one question every ``auto`` asks."""
    return native_bf16(device_facts(device_type))


def device_facts(device_type: str) -> DeviceFacts:
    """The facts of this machine's ``device_type`` (read once per process and device type)."""
    return _device_facts(device_type)


@functools.cache
def _device_facts(device_type: str) -> DeviceFacts:
    if device_type == "cuda":
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        return DeviceFacts("cuda", cuda_capability=capability)
    if device_type != "cpu":
        return DeviceFacts(device_type)
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn_bf16 = False
    return DeviceFacts(
        "cpu",
        machine=platform.machine(),
        cpu_flags=_cpu_flags(),
        onednn_isa_cap=os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        torch_mkldnn_bf16=mkldnn_bf16,
    )


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's flags (x86 ``flags``, ARM ``Features``); empty where there is no cpuinfo."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def accelerator_device_type(accelerator: object) -> str:
    """The device type a Trainer's ``accelerator`` (a name or an Accelerator) runs on; ``auto`` and ``gpu``
    as Lightning reads them: CUDA when present, then Apple's MPS, else the CPU."""
    if accelerator is None:
        name = "auto"
    elif isinstance(accelerator, str):
        name = accelerator.lower()
    else:  # an Accelerator instance: CUDAAccelerator, CPUAccelerator, ...
        name = type(accelerator).__name__.lower().removesuffix("accelerator")
    if name in ("auto", "gpu"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    return name


@dataclass(frozen=True)
class PrecisionChoice:
    """A resolved Trainer precision: what Lightning gets, what was asked, and the reason in words."""

    precision: str
    requested: str
    reason: str

    def describe(self) -> str:
        if self.requested == "auto":
            return f"precision auto -> {self.precision} ({self.reason})"
        return f"precision {self.precision} (as configured; {self.reason})"


def resolve_trainer_precision(requested: object, device_type: str, facts: DeviceFacts | None = None) -> PrecisionChoice:
    """What a Trainer's ``precision`` means on this device: ``auto`` -> ``bf16-mixed`` where bfloat16 is
    native, else ``32-true``; an explicit precision stays, with a warning naming the cost when it asks for
    bfloat16 where bfloat16 is emulated. An unknown name is a :class:`PrecisionError` naming the key."""
    asked = "32-true" if requested is None else str(requested)
    if asked not in ("auto", *LIGHTNING_PRECISIONS):
        raise PrecisionError(
            f"trainer.precision: expected auto or one of {', '.join(LIGHTNING_PRECISIONS)}, found {asked!r}"
        )
    native, reason = native_bf16(facts) if facts is not None else native_bf16_on(device_type)
    if asked == "auto":
        return PrecisionChoice("bf16-mixed" if native else "32-true", "auto", reason)
    if asked.startswith("bf16") and not native:
        warnings.warn(bf16_cost_warning(f"trainer.precision {asked}", reason), stacklevel=2)
    return PrecisionChoice(asked, asked, reason)


def bf16_cost_warning(what: str, reason: str) -> str:
    """The warning for bfloat16 asked for where it is emulated."""
    return (f"{what} on a device without native bfloat16 ({reason}): expect it to run many times slower "
            "than float32 (29 x on an AVX2 CPU, docs/getting-started.md, 'Precision'); precision auto picks "
            "float32 here")
