"""Clicks as dense maps: a Gaussian blob per click on the crop's voxel grid, positive and negative apart.

The sparse tokens tell the decoder's transformer where the clicks are; the maps put them where convolutions see
them, beside the previous mask, at the window's full resolution (as DeepEdit and nnInteractive give clicks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .prompt_encoder import NEGATIVE, POSITIVE

_CHUNK = 16  # clicks rendered at once


def render_click_maps(
    coords: torch.Tensor | None, labels: torch.Tensor | None, size: Sequence[int], sigma: float = 2.0
) -> torch.Tensor:
    """Positive and negative click maps.

    Args:
        coords: ``(B, N, 3)`` float voxel indices of the crop (array order), or None (no clicks).
        labels: ``(B, N)``: 1 positive, 0 negative; anything else (padding, box corners) draws nothing.
        size: the crop's spatial size ``(D, H, W)`` in voxels.
        sigma: the blob's standard deviation in voxels.

    Returns:
        ``(B, 2, D, H, W)`` float32 in ``[0, 1]``: channel 0 the positive clicks, 1 the negative ones; where
        blobs overlap, the maximum (a cluster of clicks is not brighter than one).
    """
    if coords is None:
        raise ValueError("render_click_maps needs coords; a step without clicks has empty maps")
    b, n, _ = coords.shape
    device = coords.device
    maps = torch.zeros(b, 2, *size, device=device)
    if not torch.compiler.is_compiling() and n == 0:
        return maps
    # a 3D Gaussian is the product of three 1D ones: (B, N, s) per axis instead of (B, N, D, H, W) distances
    axes = [
        torch.exp(
            -0.5 * ((torch.arange(s, device=device, dtype=torch.float32) - coords[..., a, None].float()) / sigma) ** 2
        )
        for a, s in enumerate(size)
    ]
    for channel, label in enumerate((POSITIVE, NEGATIVE)):
        chosen = (labels == label).float()  # (B, N)
        if not torch.compiler.is_compiling() and not bool(chosen.any()):  # a traced graph has no data to branch on
            continue
        # chunks of clicks bound the memory however many there are; an exported graph (dynamic click count) takes
        # them at once
        parts = (
            [slice(None)] if torch.compiler.is_compiling() else [slice(lo, lo + _CHUNK) for lo in range(0, n, _CHUNK)]
        )
        for part in parts:
            blobs = torch.einsum("bn,bnd,bnh,bnw->bndhw", chosen[:, part], *(x[:, part] for x in axes))
            maps[:, channel] = torch.maximum(maps[:, channel], blobs.amax(dim=1))
    return maps
