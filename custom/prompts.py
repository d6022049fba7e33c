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
