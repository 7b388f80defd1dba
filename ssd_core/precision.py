"""Where a model runs and in which numeric precision: `resolve_device`, `resolve_precision`, `autocast`.

int8 is an inference precision: a model calibrated by `ssd_core.quantize` runs it on the CPU through
`ssd_core.inference.optimize_for_inference`; training refuses it (`check_trainable`)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "auto")
TRAINING_PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto": the first CUDA device if there is one, else the CPU; "cuda" without one is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' asked for, but no CUDA device is available")
    return device


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bf16 convolutions beat fp32 several times."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        flags = ""
    if " amx_bf16" in flags or " avx512_bf16" in flags:
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and "amx" in flags
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """Concrete precision ("fp32", "bf16", "fp16" or "int8") for `precision` on `device`.

    auto: bf16 on CPUs with AMX/AVX512-BF16; bf16 on CUDA GPUs that support it, else fp16; else fp32
    (a model calibrated for int8 picks int8 on CPU itself, see `SSD.effective_precision`).
    fp16 is a CUDA precision: on CPU it is refused rather than silently slow; int8 is a CPU precision
    (PyTorch's x86 int8 kernels) and is refused on CUDA.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    kind = torch.device(device).type
    if precision == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if kind == "cpu" and cpu_has_fast_bf16():
            return "bf16"
        return "fp32"
    if precision == "fp16" and kind == "cpu":
        raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' or 'auto' on CPU")
    if precision == "int8" and kind != "cpu":
        raise ValueError(f"precision 'int8' runs on the CPU (PyTorch's x86 int8 kernels), not on {kind}; "
                         "use 'auto' on a GPU")
    return precision


def check_trainable(precision: str) -> None:
    """ValueError unless `precision` is one a model can train in (int8 is for inference only)."""
    if precision == "int8":
        raise ValueError("precision 'int8' is for inference only: train in fp32, bf16 or auto, then calibrate "
                         "the checkpoint with `ssd quantize`")
    if precision not in TRAINING_PRECISIONS:
        raise ValueError(f"training precision must be one of {', '.join(TRAINING_PRECISIONS)}; got {precision!r}")


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """Autocast for a concrete precision; fp32 and int8 (quantized modules, fp32 around them) run without it."""
    kind = torch.device(device).type
    if precision in ("fp32", "int8"):
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=kind, dtype=dtype):
        yield
