"""Clicks: where they come from when no user gives them.

Coordinates are voxel indices in array order, as float tensors ``(3,)``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def deepest_point(mask: torch.Tensor) -> torch.Tensor | None:
    """The voxel of a binary ``(D, H, W)`` mask farthest from its border (first one on ties); None if empty.

    Used as a positive click where an object continues into a window that holds none of the user's clicks.
    """
    array = mask.detach().cpu().numpy().astype(bool)
    if not array.any():
        return None
    distance = ndimage.distance_transform_edt(np.pad(array, 1))[1:-1, 1:-1, 1:-1]
    return torch.as_tensor(np.unravel_index(int(np.argmax(distance)), array.shape), dtype=torch.float32)


def uniform_error_click(
    prediction: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, int] | None:
    """A click drawn uniformly from the error region of one volume (reference §4, training protocol).

    Args:
        prediction: ``(D, H, W)`` bool, the current foreground (all False before the first click).
        target: ``(D, H, W)`` bool ground truth.
        generator: for reproducible draws.

    Returns:
        the voxel ``(3,)`` (float, array order) and its label: 1 if it is a false negative (missed
        foreground), 0 if a false positive; None when the prediction is already perfect.
    """
    error = prediction ^ target
    candidates = torch.nonzero(error)
    if len(candidates) == 0:
        return None
    pick = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
    return pick.float(), int(target[tuple(pick)])
