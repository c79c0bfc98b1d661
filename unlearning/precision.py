"""The one place that decides the compute dtype: bf16 autocast only where the hardware runs it natively.

On a CPU without native bf16 (AVX2 only: older Intel, AMD Zen 2/3, many cloud VMs) PyTorch
emulates bf16 autocast, which measured 10-26x slower than fp32 there; with native bf16
(AVX512-BF16 or AMX) it is ~2x faster for our tiny CLIP. So ``auto`` asks the hardware:

- CUDA: ``torch.cuda.is_bf16_supported()``;
- CPU: the kernel flags (``avx512_bf16`` / ``amx_bf16`` in ``/proc/cpuinfo``) *and* what PyTorch
  will actually dispatch to — oneDNN's bf16 support (``DNNL_MAX_CPU_ISA`` can cap it) and ATen's
  CPU capability (``ATEN_CPU_CAPABILITY`` can cap it). Where the flags cannot be read (not Linux),
  a short measured probe decides;
- anything else (MPS, ...): fp32.

Stages differ under ``auto``: only ``train`` (the bootstrap, the retrain oracle, the test model)
follows the hardware. Unlearning, synthesis and evaluation stay fp32 because their stop
thresholds and the gates' 1-2 pt margins were calibrated in fp32, before and after must be scored
alike, and they are a small share of the time. An explicit ``bf16`` applies to every stage.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel

Requested = Literal["auto", "fp32", "bf16"]
Stage = Literal["train", "unlearn", "synthesis", "evaluate"]
HARDWARE_STAGES: tuple[Stage, ...] = ("train",)


class Precision(BaseModel):
    """A resolved choice: the dtype a stage computes in, and why."""

    dtype: Literal["fp32", "bf16"]
    reason: str

    @property
    def bf16(self) -> bool:
        return self.dtype == "bf16"


def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU feature flags the kernel reports, or None where there is no such file."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def _torch_cpu_bf16() -> tuple[bool, str]:
    """Whether PyTorch will run bf16 kernels natively here, honouring its ISA caps."""
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):  # "AVX2", "DEFAULT", "NO AVX"...; ATEN_CPU_CAPABILITY can cap it
        return False, f"ATen CPU capability {capability}"
    onednn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if onednn is not None and not onednn():  # DNNL_MAX_CPU_ISA can cap it
        return False, "oneDNN has no bf16 kernels on this CPU/ISA setting"
    return True, f"ATen CPU capability {capability}"


def measured_cpu_bf16(size: int = 256, repeats: int = 3) -> bool:
    """A short probe: is a bf16 autocast matmul at least as fast as the fp32 one?"""
    a, b = torch.randn(size, size), torch.randn(size, size)

    def seconds(enabled: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            (a @ b).sum()
            started = time.perf_counter()
            for _ in range(repeats):
                (a @ b).sum()
        return time.perf_counter() - started

    return seconds(True) <= seconds(False)


@lru_cache(maxsize=None)
def native_bf16(device_type: str) -> tuple[bool, str]:
    """Whether ``device_type`` runs bf16 natively, and the evidence."""
    if device_type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "CUDA bf16 supported" if ok else "CUDA device without bf16"
    if device_type != "cpu":
        return False, f"{device_type}: fp32 by policy"
    flags = cpu_flags()
    if flags is None:
        ok = measured_cpu_bf16()
        return ok, f"measured probe: bf16 {'as fast as' if ok else 'slower than'} fp32"
    hardware = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if not hardware:
        return False, "CPU flags show no avx512_bf16/amx_bf16 (bf16 would be emulated)"
    ok, why = _torch_cpu_bf16()
    return ok, f"CPU flags {'+'.join(hardware)}, {why}"


def resolve_precision(requested: Requested = "auto", device: str | torch.device = "cpu", stage: Stage = "train") -> Precision:
    """The dtype ``stage`` computes in on ``device`` for the ``requested`` setting."""
    device_type = torch.device(device).type
    if requested == "fp32":
        return Precision(dtype="fp32", reason="requested fp32")
    native, why = native_bf16(device_type)
    if requested == "bf16":
        return Precision(dtype="bf16", reason=f"requested bf16 ({'native' if native else 'EMULATED, slow'}: {why})")
    if stage not in HARDWARE_STAGES:
        return Precision(dtype="fp32", reason=f"auto: {stage} stays fp32 (calibrated in fp32)")
    return Precision(dtype="bf16" if native else "fp32", reason=f"auto: {why}")


def autocast(precision: Precision, device: str | torch.device):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if not precision.bf16:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
