"""The prompts of a case, in the one form they travel in from :class:`~custom.transforms.ClicksToVoxelsd` (which
checks them against the image) to the predictor (:class:`~custom.inferer.PromptedInferer`): each object's clicks
and box as voxel indices of the image's stored grid, array order, with the object as it was requested (for the
report). No padding into tensors, no serialised copies.

Also the one world-to-voxel conversion and the one "inside the image" check, used by the transform and by
:meth:`custom.predictor.VolumetricPredictor.add_click`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from monai.transforms.utils import apply_affine_to_points

from .cases import CaseError

Point = tuple[float, float, float]

#: where :class:`~custom.transforms.ClicksToVoxelsd` also leaves a case's :class:`CasePrompts`, in the image's
#: metadata, for an inferer called as ``inferer(inputs, network)`` (MONAI Label)
PROMPTS_META = "prompted_objects"


@dataclass(frozen=True)
class ObjectPrompts:
    """One object's prompts, checked against its image.

    Attributes:
        label: the value the object gets in the label map.
        clicks: ``(voxel, positive)`` in the order given; voxel indices of the stored grid (array order, float).
        box: the min and max corners (stored-grid voxels), or None; given to the predictor before the clicks.
        given: the object as requested (points in their own space), repeated in the report.
    """

    label: int
    clicks: tuple[tuple[Point, bool], ...] = ()
    box: tuple[Point, Point] | None = None
    given: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str | None:
        """The object's name as requested (label-name clicks of MONAI Label's deepedit), if any."""
        name = self.given.get("name")
        return None if name is None else str(name)


@dataclass(frozen=True)
class CasePrompts:
    """The :class:`ObjectPrompts` of one case, one value per batch item.

    MONAI's collation would transpose a list of objects across the batch, and its de-collation (which engines run
    before post-processing) walks into every iterable: this holder is not iterable and declares itself a 0-d
    value (``ndim == 0``, ``item()``, as a scalar tensor does), so that :func:`monai.data.decollate_batch` hands
    each item its own, unchanged; :func:`custom.data.collate_cases` builds the batch side.
    """

    objects: tuple[ObjectPrompts, ...] = ()
    ndim: ClassVar[int] = 0

    def item(self) -> CasePrompts:
        return self


def world_to_voxel(points: np.ndarray | Sequence[Sequence[float]], affine: np.ndarray) -> np.ndarray:
    """``(N, 3)`` world coordinates (mm, the affine's space) -> float voxel indices of the grid of ``affine``."""
    points = torch.as_tensor(np.asarray(points, np.float64).reshape(1, -1, 3))
    to_voxel = torch.linalg.inv(torch.as_tensor(np.asarray(affine, np.float64)))
    return apply_affine_to_points(points, to_voxel, dtype=torch.float64)[0].numpy()


def check_inside_image(
    voxels: np.ndarray, given: Sequence[Any], space: str, shape: Sequence[int], what: str = "point"
) -> None:
    """Raise a :class:`~custom.cases.CaseError` (a ValueError) naming the first of ``voxels`` outside an image of
    ``shape``: each voxel index must lie in ``-0.5 .. n - 0.5`` (voxel ``i`` spans ``i - 0.5`` to ``i + 0.5``, so
    ``-0.4`` is in voxel 0 and ``-0.6`` outside).

    Args:
        voxels: ``(N, 3)`` voxel indices.
        given: the same points as given (named in the message).
        space: ``"voxel"`` or ``"world"``, what ``given`` is in.
        shape: the image's spatial shape.
        what: the message's start (``"case 'x', object label 1: point"``).
    """
    shape = np.asarray(shape)
    outside = np.any((voxels < -0.5) | (voxels > shape - 0.5), axis=1)
    if outside.any():
        j = int(np.argmax(outside))
        raise CaseError(
            f"{what} {list(given[j])} ({'mm' if space == 'world' else 'voxels'}) is outside the image "
            f"(voxel {np.round(voxels[j], 2).tolist()}, image shape {shape.tolist()}): each voxel index must lie "
            "in -0.5 .. n - 0.5, voxel i spanning i - 0.5 to i + 0.5"
        )


def object_prompts(obj: Mapping[str, Any], affine: np.ndarray, shape: Sequence[int], where: str) -> ObjectPrompts:
    """A parsed object (:func:`custom.cases.parse_case`: ``label``, ``points``, ``point_labels``, ``space``, and
    ``box`` ``{"min", "max", "space"}``) checked against an image (``affine``, spatial ``shape``) and expressed
    on its stored grid; ``where`` starts the error messages."""
    clicks: tuple[tuple[Point, bool], ...] = ()
    if obj["points"]:
        voxels = np.asarray(obj["points"], np.float64).reshape(-1, 3)
        if obj["space"] == "world":
            voxels = world_to_voxel(voxels, affine)
        check_inside_image(voxels, obj["points"], obj["space"], shape, f"{where}: point")
        clicks = tuple((tuple(float(c) for c in v), bool(m)) for v, m in zip(voxels.tolist(), obj["point_labels"]))
    box = None
    if "box" in obj:
        given = obj["box"]
        corners = np.asarray([given["min"], given["max"]], np.float64)
        if given["space"] == "world":
            corners = world_to_voxel(corners, affine)
        check_inside_image(corners, [given["min"], given["max"]], given["space"], shape, f"{where}: box corner")
        low, high = corners.min(0).tolist(), corners.max(0).tolist()
        box = (tuple(low), tuple(high))
    return ObjectPrompts(int(obj["label"]), clicks, box, given=dict(obj))
