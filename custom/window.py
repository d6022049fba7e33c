"""The predictor's window: a cube cut out of the network grid (zero-padded past the border) and its intensity
normalisation, shared by inference and the training transforms that build the same windows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data import MetaTensor


def normalize_crop(crop: torch.Tensor) -> torch.Tensor:
    """Upstream's intensity normalisation: z-score with the mean and unbiased std of the voxels > 0 of the
    crop, applied to every voxel (not MONAI's ``nonzero=True``, which leaves zeros untouched)."""
    positive = crop[crop > 0]
    if positive.numel() < 2:  # nothing positive (an all-negative CT crop): fall back to every voxel
        positive = crop.reshape(-1)
    std = positive.std() if positive.numel() > 1 else crop.new_tensor(0.0)
    return (crop - positive.mean()) / torch.clamp(std, min=1e-8)


def extract_window(image: torch.Tensor, start: Sequence[int], size: int | Sequence[int]) -> torch.Tensor:
    """The window of ``image (C, D, H, W)`` starting at ``start`` with side(s) ``size``; parts outside the
    image are zero-padded. Returns a plain tensor ``(C, *size)``."""
    sizes = [size] * 3 if isinstance(size, int) else list(size)
    out = image.new_zeros((image.shape[0], *sizes))
    out = out.as_tensor() if isinstance(out, MetaTensor) else out
    src, dst = [], []
    for s, side, extent in zip(start, sizes, image.shape[1:]):
        lo, hi = max(s, 0), min(s + side, extent)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    region = image[(slice(None), *src)]
    out[(slice(None), *dst)] = region.as_tensor() if isinstance(region, MetaTensor) else region
    return out
