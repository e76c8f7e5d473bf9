"""Device and precision choice in one place, so no module hard-codes ``.cuda()``."""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``/None into ``cuda`` when a GPU is visible, else ``cpu``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was requested but CUDA is not available; use 'cpu' or 'auto'")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """Validate ``precision`` for ``device``; fp16 on CPU is upcast to fp32 with a warning.

    bf16 autocast works on CPU, so it is kept there. fp16 kernels are missing or slow on
    CPU, and a silent failure deep inside a model is worse than an explicit upcast.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; choose one of {sorted(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        warnings.warn("precision='fp16' is not supported on CPU; running in fp32 instead", stacklevel=2)
        return "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """Return an autocast context for ``precision`` (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])
