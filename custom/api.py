"""A safe programmatic entry to the inference workflow: values in, files out, no expression parser on the way.

``python -m monai.bundle run ... --input_dict "{'image': ...}"`` hands every string to MONAI's config parser,
which evaluates strings that start with ``$`` and resolves ``@`` references, so a file name such as
``$__import__('os').system(...).nii.gz`` would run code. :func:`segment` runs the same
``configs/inference.json`` with the user's values put into the parsed configuration as Python objects (a
:class:`~custom.data.CaseList`, ``Path`` objects), which the parser never evaluates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .data import CaseList
from .networks.registry import available_networks
from .precision import check_autocast_dtype
from .prompts import check_click_memory


def segment(
    image: str | os.PathLike,
    points: Sequence[Sequence[float]] | None = None,
    point_labels: Sequence[int] | None = None,
    *,
    bundle_root: str | os.PathLike,
    objects: Sequence[Mapping[str, Any]] | None = None,
    space: str = "voxel",
    output_dir: str | os.PathLike = "eval",
    modality: str = "",
    prev_mask: str | os.PathLike | None = None,
    network_name: str | None = None,
    ckpt_path: str | os.PathLike | None = None,
    click_memory: str | None = None,
    autocast_dtype: str | None = None,
    max_windows_per_object: int = 8,
    spacing_mm: Sequence[float] = (1.5, 1.5, 1.5),
    series_uid: str | None = None,
    max_clicks_per_object: int = 100,
    output_ext: str = ".nii.gz",
    preview: bool = True,
) -> Path:
    """Segment one image from clicks with ``<bundle_root>/configs/inference.json`` and return the mask's path.

    Args:
        image: the image file (NIfTI, NRRD/MHA) or DICOM folder.
        points: one object's clicks, ``[[i, j, k], ...]`` (voxel indices of the stored image, or mm with
            ``space="world"``); or give ``objects``.
        point_labels: 1 positive, 0 negative, one per point.
        bundle_root: the bundle folder (the one holding ``configs/`` and ``models/``).
        objects: several objects, ``[{"label": 1, "points": ..., "point_labels": ...}, ...]``.
        space: ``"voxel"`` or ``"world"`` for ``points``.
        output_dir: where ``<case>/<case>_seg<output_ext>`` and its report go.
        modality: e.g. ``"CT"`` (intensity clamping as in training).
        prev_mask: an earlier label map of this image to continue from.
        network_name, ckpt_path: the network (default: the shipped model of ``bundle_root`` and the variant its
            ``inference.json`` names).
        click_memory, autocast_dtype, max_windows_per_object, spacing_mm, max_clicks_per_object: as in
            ``inference.json``.
        series_uid: the DICOM series to segment when ``image`` is a folder holding several.
        output_ext: ``.nii.gz``, ``.nrrd`` or ``.dcm`` (a DICOM-SEG; ``image`` must be a DICOM series folder).
        preview: also write ``<case>_seg.png`` (three slices through each object, outlined in its label colour).

    Raises:
        RuntimeError: the case failed (the message names why); ValueError: an unknown option value.
    """
    from monai.bundle import ConfigWorkflow

    from .io import check_output_ext

    if network_name is not None and network_name not in available_networks():
        raise ValueError(f"unknown network_name {network_name!r}; registered: {', '.join(available_networks())}")
    if space not in ("voxel", "world"):
        raise ValueError(f"space must be 'voxel' or 'world', got {space!r}")
    bundle_root = Path(bundle_root)
    entry: dict[str, Any] = {"image": str(image), "modality": str(modality)}
    if objects is not None:
        entry["objects"] = [dict(obj) for obj in objects]
    else:
        entry["points" if space == "voxel" else "points_world"] = [list(p) for p in points or []]
        entry["point_labels"] = list(point_labels or [])
    if prev_mask is not None:
        entry["prev_mask"] = str(prev_mask)
    if series_uid is not None:
        entry["series_uid"] = str(series_uid)
    cases = CaseList.prompted(input_dict=entry)
    if cases.failures:
        cases.raise_if_failed()
    # Every value that came from the caller enters as an object, not as a string the parser would evaluate.
    overrides: dict[str, Any] = {
        "bundle_root": str(bundle_root),
        "input_dict": None,
        "datalist": None,
        "cases": cases,
        "output_dir": Path(output_dir),
        "ckpt_path": Path(ckpt_path) if ckpt_path is not None else bundle_root / "models" / "model.pt",
        "autocast_dtype": check_autocast_dtype(autocast_dtype),
        "max_windows_per_object": int(max_windows_per_object),
        "spacing_mm": [float(s) for s in spacing_mm],
        "max_clicks_per_object": int(max_clicks_per_object),
        "output_ext": check_output_ext(output_ext),
        "preview": bool(preview),
    }
    # None: what the bundle's inference.json says (the variant and click memory its model.pt was trained with)
    if network_name is not None:
        overrides["network_name"] = network_name
    if click_memory is not None:
        overrides["click_memory"] = check_click_memory(click_memory)
    workflow = ConfigWorkflow(
        config_file=str(bundle_root / "configs" / "inference.json"), workflow_type="infer", **overrides
    )
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()
    case = cases.cases[0]["case"]
    return Path(output_dir) / case / f"{case}_seg{output_ext}"
