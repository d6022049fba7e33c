"""Clicks: where they come from when no user gives them (window growth, training and evaluation protocols).

Coordinates are voxel indices in array order, as float tensors ``(3,)``; masks are ``(D, H, W)`` bool.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from monai.transforms.utils import generate_spatial_bounding_box
from scipy import ndimage

#: What each prompt step of a window is given besides the previous logits: ``"all"``, every click so far (what
#: upstream's inference does, ``utils/infer_utils.py``, and what the variants trained here are trained with; the
#: default), or ``"newest"``, the newest click only (upstream's training, reference §4).
CLICK_MEMORIES = ("newest", "all")


def check_click_memory(name: str) -> str:
    """``name`` if it is one of :data:`CLICK_MEMORIES`, else a ValueError naming the choices."""
    if name not in CLICK_MEMORIES:
        raise ValueError(f"click_memory must be one of {CLICK_MEMORIES}, got {name!r}")
    return name


def prompt_points(
    steps: Sequence[Sequence[tuple[torch.Tensor, int]]], memory: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The points of one prompt step from a window's prompts so far, one group per step (a click, or a box's
    two corners), oldest first: ``(n, 3)`` coords and ``(n,)`` labels of the newest group alone or of all of
    them (``memory``, see :data:`CLICK_MEMORIES`)."""
    chosen = steps[-1:] if check_click_memory(memory) == "newest" else steps
    points = [point for group in chosen for point in group]
    return torch.stack([c for c, _ in points]).float(), torch.tensor([label for _, label in points])


def mask_box(mask: torch.Tensor | np.ndarray, margin: int | Sequence[int] = 0) -> list[tuple[int, int]] | None:
    """The bounding box ``[lo, hi)`` per axis of a binary mask of any dimension (MONAI's
    ``generate_spatial_bounding_box``), widened by ``margin`` voxels (one number, or one per axis) within the
    mask's shape; None if empty."""
    if not mask.any():
        return None
    start, end = generate_spatial_bounding_box(mask[None])
    margins = np.broadcast_to(np.asarray(margin, dtype=np.int64), (len(start),))
    return [
        (max(int(lo) - int(m), 0), min(int(hi) + int(m), n)) for lo, hi, m, n in zip(start, end, margins, mask.shape)
    ]


def challenge_box(target: torch.Tensor, margin: int = 0, axial_axis: int = 0) -> dict[str, int] | None:
    """The challenge's box of a 3D ground truth: the z range of the target (z: array axis ``axial_axis``, 0 in
    the challenge's (D, H, W) arrays), and on its middle foreground slice the 2D bounding box widened by ``margin``
    voxels (clipped); None if empty."""
    array = np.moveaxis(target.cpu().numpy().astype(bool), axial_axis, 0)
    slices = np.nonzero(array.any(axis=(1, 2)))[0]
    if len(slices) == 0:
        return None
    z_min, z_max = int(slices[0]), int(slices[-1])
    z_mid = int(slices[len(slices) // 2])
    (y_lo, y_hi), (x_lo, x_hi) = mask_box(array[z_mid], margin)
    return {
        "z_min": z_min,
        "z_max": z_max,
        "z_mid": z_mid,
        "z_mid_x_min": x_lo,
        "z_mid_y_min": y_lo,
        "z_mid_x_max": x_hi - 1,
        "z_mid_y_max": y_hi - 1,
    }


def axial_axis(affine: Any) -> int:
    """The array axis of a voxel-to-world ``affine`` (RAS or LPS) that runs most nearly head to foot."""
    return int(np.argmax(np.abs(np.asarray(affine, np.float64)[2, :3])))


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


def inner_core_click(
    prediction: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, int] | None:
    """The paper-era click (reference §4): from the larger error region (false negatives or false positives,
    whichever reaches farther from its border by Euclidean distance transform), uniformly among its voxels
    farther than half that maximum from the border. Positive on a false negative."""
    false_negative = (target & ~prediction).cpu().numpy()
    false_positive = (prediction & ~target).cpu().numpy()
    best = None
    for region, label in ((false_negative, 1), (false_positive, 0)):
        if region.any():
            distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1, 1:-1]
            # on a tie the false positive wins, as upstream (positive only if the miss is strictly deeper)
            if best is None or distance.max() >= best[0].max():
                best = (distance, label)
    if best is None:
        return None
    distance, label = best
    candidates = torch.as_tensor(np.argwhere(distance > distance.max() / 2))
    if len(candidates) == 0:  # a one-voxel-thick region: its maximum is its only depth
        candidates = torch.as_tensor(np.argwhere(distance == distance.max()))
    pick = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
    return pick.float(), label


def paper_click(
    prediction: torch.Tensor, target: torch.Tensor, click_index: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, int] | None:
    """Clicks 1 and 2 from the inner core of the larger error region, later ones uniform in the error region."""
    if click_index <= 2:
        return inner_core_click(prediction, target, generator)
    return uniform_error_click(prediction, target, generator)


def uniform_click(
    prediction: torch.Tensor, target: torch.Tensor, click_index: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, int] | None:
    """Every click uniform in the error region (the first one therefore uniform in the target)."""
    return uniform_error_click(prediction, target, generator)


def largest_error_click(
    prediction: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, int] | None:
    """The click of the CVPR 2025 interactive 3D segmentation challenge (``CVPR25_iter_eval.py``): the error
    region's largest 26-connected component, the Euclidean distance transform over that component's bounding
    box padded by ``max(25 %, 1 voxel)`` per axis, the click at its maximum (ties broken by a seeded uniform
    choice); foreground where the ground truth is foreground.

    Returns:
        the voxel ``(3,)`` (float, array order) and its label, or None when the prediction is perfect.
    """
    error = (prediction ^ target).cpu().numpy()
    if not error.any():
        return None
    components, count = ndimage.label(error, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.ravel())[1:]
    component = components == int(np.argmax(sizes)) + 1
    box = []
    for (lo, hi), extent in zip(mask_box(component), component.shape):
        pad = max(int(round(0.25 * (hi - lo))), 1)
        box.append(slice(max(lo - pad, 0), min(hi + pad, extent)))
    distance = ndimage.distance_transform_edt(component[tuple(box)])
    candidates = np.argwhere(distance == distance.max())
    pick = candidates[int(torch.randint(len(candidates), (1,), generator=generator))] + [b.start for b in box]
    point = torch.as_tensor(pick, dtype=torch.float32)
    return point, int(target.cpu()[tuple(int(c) for c in pick)])


def cvpr25_click(
    prediction: torch.Tensor, target: torch.Tensor, click_index: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, int] | None:
    """Every click at the centre of the largest error component (see :func:`largest_error_click`)."""
    return largest_error_click(prediction, target, generator)


#: Named click-simulation protocols: ``(prediction, target, click_index (1-based), generator) -> click``.
CLICK_PROTOCOLS = MappingProxyType({"uniform": uniform_click, "paper": paper_click, "cvpr25": cvpr25_click})


def simulated_click(
    protocol: str, prediction: torch.Tensor, target: torch.Tensor, click_index: int, generator: torch.Generator
) -> tuple[torch.Tensor, int] | None:
    """The next click of a named protocol (see :data:`CLICK_PROTOCOLS`)."""
    if protocol not in CLICK_PROTOCOLS:
        raise ValueError(f"unknown click protocol {protocol!r}; known: {sorted(CLICK_PROTOCOLS)}")
    return CLICK_PROTOCOLS[protocol](prediction, target, click_index, generator)
