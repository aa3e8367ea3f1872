"""Mixed precision where the hardware has fast bf16: CUDA GPUs, and CPUs with AVX512-BF16 / AMX (bf16
matmuls there run ~4x faster than fp32). Weights stay in their dtype; matmuls run in bf16 under autocast.
"""

from __future__ import annotations

import contextlib
import functools

from taille.errors import TailleError

PRECISIONS = ("auto", "bf16-mixed", "fp32")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def check_precision(precision: str) -> None:
    """Refuse an unknown --precision when settings are built (resolving it needs the device, later)."""
    if precision not in PRECISIONS:
        raise TailleError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")


def resolve_precision(precision: str, device: str) -> str:
    """'auto' → 'bf16-mixed' on a CUDA GPU with bf16 or a CPU with AMX/AVX512-BF16, else 'fp32'."""
    import torch

    if precision not in PRECISIONS:
        raise TailleError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16-mixed" if device == "cpu" and cpu_has_fast_bf16() else "fp32"


def frozen_weights_dtype(precision: str) -> str:
    """The `load_model` dtype of a model that only runs forward (a teacher): bf16 weights on a bf16 GPU unless
    the run asked for fp32, which then means fp32 weights as well as fp32 matmuls."""
    return "fp32" if precision == "fp32" else "auto"


def autocast(precision: str, device: str):
    """A context that runs matmuls in bf16 for 'bf16-mixed', and does nothing for 'fp32'."""
    import torch

    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()
