"""A picture of a segmentation to look at: for each object, three orthogonal slices through its centre, the image
windowed for its modality, the object's outline in its label colour, its clicks marked.

Drawn with matplotlib's Agg canvas (no display, no pyplot state), written atomically (:mod:`custom.files`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data.utils import affine_to_spacing

from .files import write_atomic
from .labels import LabelTable

#: size of one panel (inches) and the resolution: each object's row is 3 panels, ``PANEL_PIXELS`` square each
PANEL_INCHES, DPI = 3.0, 100
PANEL_PIXELS = int(PANEL_INCHES * DPI)
#: display windows (lower, upper) by modality; other images: the 0.5th to 99.5th percentile
WINDOWS = {"CT": (-160.0, 240.0)}  # soft tissue: level 40, width 400 HU


def preview_size(n_objects: int) -> tuple[int, int]:
    """(width, height) in pixels of the preview of ``n_objects`` objects (at least one row)."""
    return 3 * PANEL_PIXELS, max(n_objects, 1) * PANEL_PIXELS


def _array(volume: Any) -> np.ndarray:
    values = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    return values[0] if values.ndim == 4 else values


def _window(image: np.ndarray, modality: str) -> tuple[float, float, str]:
    if modality.upper() in WINDOWS:
        lower, upper = WINDOWS[modality.upper()]
        return lower, upper, f"{modality.upper()} window {lower:g}..{upper:g}"
    finite = image[np.isfinite(image)]
    lower, upper = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    return float(lower), float(max(upper, lower + 1e-6)), "window 0.5-99.5 percentile"


def render_preview(
    image: Any,
    label_map: Any,
    labels: LabelTable | None = None,
    clicks: Mapping[int, Sequence[tuple[Sequence[float], bool]]] | None = None,
    modality: str = "",
):
    """The preview as a matplotlib ``Figure`` (Agg canvas), :func:`preview_size` pixels.

    Args:
        image, label_map: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` on the same grid; its affine (a ``MetaTensor``'s, else
            identity) turns the slices to the patient's axes: axial and coronal seen from the feet and the front
            (the patient's right on the left), sagittal from the patient's left.
        labels: names and colours.
        clicks: label value -> its clicks, ``(voxel indices of the stored grid, positive)`` (as
            :class:`~custom.object_prompts.ObjectPrompts` holds them); the objects shown are these, else the values
            in ``label_map``.
        modality: picks the display window (:data:`WINDOWS`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = labels or LabelTable()
    affine = np.asarray(getattr(image, "affine", np.eye(4)), np.float64)
    ornt = nib.orientations.io_orientation(affine)  # stored axes -> R, A, S
    volume = nib.orientations.apply_orientation(_array(image).astype(np.float32), ornt)
    mask = nib.orientations.apply_orientation(_array(label_map).astype(np.int64), ornt)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = affine_to_spacing(np.asarray(affine, np.float64))
    shape = np.asarray(volume.shape)

    stored = np.asarray(_array(image).shape)

    def to_ras(points: np.ndarray) -> np.ndarray:  # stored voxel indices -> those of ``volume``
        out = np.empty_like(points, dtype=np.float64)
        for axis, (target, flip) in enumerate(ornt.astype(int)):
            out[:, target] = points[:, axis] if flip > 0 else stored[axis] - 1 - points[:, axis]
        return out

    clicks = dict(clicks or {})
    values = sorted(clicks) or sorted(int(v) for v in np.unique(mask) if v > 0)
    lower, upper, window = _window(volume, modality)
    width, height = preview_size(len(values))
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="black")
    FigureCanvasAgg(figure)
    # (name, slicing axis, the two in-plane axes shown as x and y, whether x is flipped to the patient's right)
    views = (("axial", 2, (0, 1), True), ("coronal", 1, (0, 2), True), ("sagittal", 0, (1, 2), False))
    for row, value in enumerate(values or [0]):
        label = labels[value]
        colour = np.asarray(label.color) / 255
        inside = np.argwhere(mask == value) if value else np.empty((0, 3))
        given = clicks.get(value, ())
        points = to_ras(np.asarray([point for point, _ in given], np.float64).reshape(-1, 3))
        kinds = np.asarray([int(positive) for _, positive in given]).reshape(-1)
        if len(inside):
            centre = np.rint(inside.mean(0)).astype(int)
        elif (kinds == 1).any():
            centre = np.rint(points[np.argmax(kinds == 1)]).astype(int)
        else:
            centre = shape // 2
        centre = np.clip(centre, 0, shape - 1)
        for column, (view, axis, (ax_x, ax_y), flip) in enumerate(views):
            axes = figure.add_axes(
                (column / 3, 1 - (row + 1) / max(len(values), 1), 1 / 3, 1 / max(len(values), 1)), facecolor="black"
            )
            axes.set_axis_off()
            take = [slice(None)] * 3
            take[axis] = int(centre[axis])
            plane = volume[tuple(take)].T  # rows: ax_y, columns: ax_x
            outline = (mask[tuple(take)] == value).T if value else None
            extent = (-0.5, shape[ax_x] - 0.5, -0.5, shape[ax_y] - 0.5)
            axes.imshow(plane, cmap="gray", vmin=lower, vmax=upper, origin="lower", extent=extent,
                        interpolation="nearest", aspect=spacing[ax_y] / spacing[ax_x])  # fmt: skip
            # contour needs at least 2 x 2 samples (a one-slice volume's side panels are 1 voxel thick)
            if outline is not None and outline.any() and min(outline.shape) >= 2:
                axes.contour(outline.astype(np.float32), levels=[0.5], colors=[colour], linewidths=2.0,
                             origin="lower", extent=extent)  # fmt: skip
            for kind, marker in ((1, "o"), (0, "X")):
                chosen = points[kinds == kind]
                if len(chosen):
                    face = colour if kind == 1 else (1.0, 0.2, 0.2)
                    axes.scatter(chosen[:, ax_x], chosen[:, ax_y], s=40, marker=marker, c=[face],
                                 edgecolors="white", linewidths=0.8, zorder=3)  # fmt: skip
            span = (-0.5, shape[ax_x] - 0.5)
            axes.set_xlim(span[::-1] if flip else span)  # flipped: the patient's right on the left of the picture
            axes.set_ylim(-0.5, shape[ax_y] - 0.5)
            title = f"{label.name} ({value}) - {view} {int(centre[axis])}" if value else f"{view} {int(centre[axis])}"
            top = 1 - row / max(len(values), 1)
            figure.text(column / 3 + 0.005, top - 0.01, title, color="white", fontsize=8, va="top")
            if row == 0 and column == 2:
                figure.text(0.995, top - 0.01, window, color="white", fontsize=7, va="top", ha="right")
    return figure


def write_preview(
    path: str | os.PathLike,
    image: Any,
    label_map: Any,
    labels: LabelTable | None = None,
    clicks: Mapping[int, Sequence[tuple[Sequence[float], bool]]] | None = None,
    modality: str = "",
) -> Path:
    """Write :func:`render_preview` as a PNG at ``path``, atomically."""
    figure = render_preview(image, label_map, labels, clicks, modality)
    return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI, facecolor="black"))
