"""Mixed precision by name, as configs give it: ``"bfloat16"``, ``"float16"`` or None (full precision)."""

from __future__ import annotations

import torch

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def check_autocast_dtype(name: str | None) -> str | None:
    """``name`` if it is a known autocast dtype or None; otherwise a ValueError naming the choices."""
    if name is not None and name not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be one of {sorted(AUTOCAST_DTYPES)} or None, got {name!r}")
    return name


def autocast(device: torch.device, name: str | None) -> torch.autocast:
    """``torch.autocast`` on ``device``'s type in the named dtype; disabled for None."""
    dtype = AUTOCAST_DTYPES[check_autocast_dtype(name)] if name else None
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)
