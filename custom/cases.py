"""What a case is, what names it and what is wrong with one: the error every reader and parser raises, the output
names derived from an image path, and the parsing of a case as given (``input_dict``, datalist entries, MONAI
Label's client form). The lowest layer of the package (NumPy and the standard library; Starlette where a MONAI
Label server has it), so that readers, transforms and datalists import it without importing each other.

A case is a dict with an ``image`` (NIfTI, NRRD/MHA or a DICOM series folder) and its prompts, either for
one object::

    {"image": "ct.nii.gz", "points": [[i, j, k], ...], "point_labels": [1, 0, ...]}

(``points_world`` instead of ``points`` gives millimetres in RAS world coordinates; an optional ``modality``,
e.g. ``"CT"``, chooses the intensity clamping as in training), or for several::

    {"image": "ct.nii.gz", "objects": [{"label": 1, "points": ..., "point_labels": ...}, ...]}

MONAI Label's client form, ``{"image": ..., "foreground": [[i, j, k], ...], "background": [...]}``, is one
object (label 1): the foreground clicks positive, the background clicks negative.

Voxel points are indices of the image as stored on disk, in array order. A DICOM folder holding several series
needs ``"series_uid"`` (its SeriesInstanceUID). After :func:`parse_case` every case has the form
``{"image": str, "case": str, "objects": [{"label", "points", "point_labels", "space"}]}`` (and ``series_uid``,
``prev_mask`` where given).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_NIFTI_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr", ".dcm")


class CaseError(ValueError):
    """A case that cannot be segmented as given; the message names the case and the value."""


@functools.cache
def _missing_prompt_class() -> type[CaseError]:
    try:  # MONAI Label's stock apps run the bundle's transforms inside a Starlette (FastAPI) request
        from starlette.exceptions import HTTPException
    except ImportError:
        return CaseError

    class MissingPromptError(CaseError, HTTPException):
        def __init__(self, detail: str) -> None:
            HTTPException.__init__(self, status_code=422, detail=detail)
            ValueError.__init__(self, detail)

        def __str__(self) -> str:
            return str(self.detail)

    return MissingPromptError


def missing_prompt_error(message: str) -> CaseError:
    """The :class:`CaseError` for a request without a prompt. Where Starlette is installed (a MONAI Label server)
    it is also Starlette's ``HTTPException`` with status 422, so that a stock MONAI Label app, which calls the
    bundle's transforms in the request, answers a client error naming the problem instead of HTTP 500."""
    return _missing_prompt_class()(message)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """``name`` as one path component that stays inside its folder: letters, digits, ``.``, ``_`` and ``-``,
    no leading dot (so never ``.`` or ``..``); ``"case"`` if nothing is left."""
    return _UNSAFE.sub("_", str(name)).lstrip(".") or "case"


def case_name(image_path: str | os.PathLike) -> str:
    """The image's file name without its extension (a DICOM folder: the folder's name), after ``..`` and
    ``.`` are resolved, made safe as a file name (:func:`safe_name`)."""
    name = Path(os.path.abspath(str(image_path))).name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return safe_name(name)


def unique_case_names(images: Sequence[str | os.PathLike], given: Sequence[str | None] | None = None) -> list[str]:
    """One distinct output name per case: ``given[i]`` where an entry names itself (``"case"``), else
    :func:`case_name`; names that collide (``a/ct.nii.gz`` and ``b/ct.nii.gz``) are prefixed with as many of
    their folders' names as it takes (``a_ct``, ``b_ct``), then numbered with the first suffix no other case
    has (``ct``, ``ct``, ``ct_2`` -> ``ct``, ``ct_3``, ``ct_2``): two cases never share an output."""
    paths = [Path(os.path.abspath(str(p))) for p in images]
    given = list(given) if given is not None else [None] * len(paths)
    names = [safe_name(g) if g else case_name(p) for p, g in zip(paths, given)]
    for depth in range(1, 1 + max((len(p.parts) for p in paths), default=1)):
        owners: dict[str, set[Path]] = {}
        for name, path in zip(names, paths):
            owners.setdefault(name, set()).add(path)
        clashing = [i for i, name in enumerate(names) if len(owners[name]) > 1 and not given[i]]
        if not clashing:
            break
        for i in clashing:
            folders = [safe_name(part) for part in paths[i].parent.parts[-depth:] if part not in ("/", "\\")]
            names[i] = "_".join([*folders, case_name(paths[i])])
    taken, seen = set(names), set()
    for i, name in enumerate(names):  # the same file listed twice
        if name in seen:
            number = 2
            while f"{name}_{number}" in taken:  # a file may be called ct_2 already
                number += 1
            names[i] = f"{name}_{number}"
            taken.add(names[i])
        seen.add(names[i])
    return names


def check_label(case: str, what: str, label: Any) -> int:
    """An object's label value: an integer in 1..32767 (the output is int16), else a CaseError naming it."""
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 1 <= int(label) <= 32767:
        raise CaseError(f"case {case!r}, {what}: 'label' must be an integer in 1..32767, got {label!r}")
    return int(label)


def _check_point_list(
    case: str, what: str, points: Any, labels: Any, need_positive: bool = True
) -> tuple[list[list[float]], list[int]]:
    if not isinstance(points, Sequence) or isinstance(points, str) or len(points) == 0:
        raise CaseError(f"case {case!r}, {what}: points must be a non-empty list of [i, j, k], got {points!r}")
    checked = []
    for point in points:
        if (
            not isinstance(point, Sequence)
            or isinstance(point, str)
            or len(point) != 3
            or not all(isinstance(c, (int, float)) and math.isfinite(c) for c in point)
        ):
            raise CaseError(f"case {case!r}, {what}: each point needs 3 finite numbers, got {point!r}")
        checked.append([float(c) for c in point])
    if labels is None:
        raise CaseError(f"case {case!r}, {what}: 'point_labels' is missing (1 positive, 0 negative per point)")
    if not isinstance(labels, Sequence) or isinstance(labels, str) or len(labels) != len(checked):
        raise CaseError(
            f"case {case!r}, {what}: {len(checked)} points but point_labels is {labels!r} (one label per point)"
        )
    if any(label not in (0, 1) or isinstance(label, bool) for label in labels):
        raise CaseError(f"case {case!r}, {what}: point_labels must be 0 or 1, got {list(labels)!r}")
    if need_positive and 1 not in labels:
        raise CaseError(f"case {case!r}, {what}: no positive click (label 1); the first one places the crop")
    return checked, [int(label) for label in labels]


def box_from_challenge(box: Mapping[str, float], axial_axis: int = 0) -> tuple[list[float], list[float]]:
    """The CVPR 2025 challenge's box (``z_min, z_max, z_mid, z_mid_x_min, z_mid_y_min, z_mid_x_max,
    z_mid_y_max``: a 2D box on slice ``z_mid`` and the z range, closed intervals) as the 3D box ``(min, max)`` it
    spans, in array order. z is array axis ``axial_axis`` (0 in the challenge's (D, H, W) arrays); y and x are the
    other two axes, in order.

    Raises:
        ValueError: naming a missing key or an empty interval.
    """
    keys = ("z_min", "z_max", "z_mid_x_min", "z_mid_y_min", "z_mid_x_max", "z_mid_y_max")
    missing = [k for k in keys if k not in box]
    if missing:
        raise ValueError(f"box {dict(box)!r} lacks {missing} (the challenge's keys: {', '.join(keys)}, z_mid)")
    low = [float(box["z_min"]), float(box["z_mid_y_min"]), float(box["z_mid_x_min"])]
    high = [float(box["z_max"]), float(box["z_mid_y_max"]), float(box["z_mid_x_max"])]
    if any(h < lo for lo, h in zip(low, high)):
        raise ValueError(f"box {dict(box)!r} has an empty interval (min > max)")
    order = [axial_axis] + [a for a in range(3) if a != axial_axis]  # array axis of z, y, x
    return [low[order.index(a)] for a in range(3)], [high[order.index(a)] for a in range(3)]


BOX_KEYS = ("box", "box_world", "box_2d")


def _parse_box(case: str, what: str, entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """An object's box: ``box`` / ``box_world`` ``{"min": [i, j, k], "max": [i, j, k]}`` (voxels / mm, closed), or
    ``box_2d`` in the CVPR 2025 challenge's form (``z_min, z_max, z_mid, z_mid_x_min, z_mid_y_min, z_mid_x_max,
    z_mid_y_max``, voxel indices, array axes (z, y, x)). Returns ``{"min", "max", "space"}`` or None."""
    given = [k for k in BOX_KEYS if k in entry]
    if not given:
        return None
    if len(given) > 1:
        raise CaseError(f"case {case!r}, {what}: give one of {', '.join(BOX_KEYS)}, not {given}")
    key, box = given[0], entry[given[0]]
    if not isinstance(box, Mapping):
        raise CaseError(f"case {case!r}, {what}: {key!r} must be a dict, got {box!r}")
    try:
        if key == "box_2d":
            low, high = box_from_challenge(box)
        else:
            low, high = ([float(c) for c in box[k]] for k in ("min", "max"))
            if len(low) != 3 or len(high) != 3 or not all(math.isfinite(c) for c in low + high):
                raise ValueError("each corner needs 3 finite numbers")
            if key == "box" and any(h < lo for lo, h in zip(low, high)):
                raise ValueError(f"min {low} is not <= max {high}")
    except (KeyError, TypeError, ValueError) as err:
        raise CaseError(f"case {case!r}, {what}: {key!r} {dict(box)!r} is not a box: {err}") from None
    return {"min": low, "max": high, "space": "world" if key == "box_world" else "voxel"}


def _parse_object(
    case: str, entry: Mapping[str, Any], label: int, what: str, need_positive: bool = True
) -> dict[str, Any]:
    box = _parse_box(case, what, entry)
    if "points" in entry and "points_world" in entry:
        raise CaseError(f"case {case!r}, {what}: give exactly one of 'points' (voxels) or 'points_world' (mm)")
    if "points" not in entry and "points_world" not in entry:
        if box is None:
            raise CaseError(f"case {case!r}, {what}: give 'points' (voxels), 'points_world' (mm) or a box")
        points, labels, space = [], [], box["space"]
    else:
        space = "voxel" if "points" in entry else "world"
        points, labels = _check_point_list(
            case,
            what,
            entry["points" if space == "voxel" else "points_world"],
            entry.get("point_labels"),
            need_positive and box is None,
        )
    parsed = {"label": label, "points": points, "point_labels": labels, "space": space}
    if box is not None:
        parsed["box"] = box
    if "name" in entry:
        parsed["name"] = str(entry["name"])
    return parsed


def entry_image(entry: Any, base_dir: str | os.PathLike | None = None) -> Path:
    """The image path of a datalist entry (relative paths start at ``base_dir``), ``..`` resolved.

    Raises:
        CaseError: the entry is not a dict with an ``image``.
    """
    if not isinstance(entry, Mapping) or "image" not in entry:
        raise CaseError(f"a case must be a dict with an 'image' path, got {entry!r}")
    image = Path(str(entry["image"])).expanduser()
    if base_dir is not None and not image.is_absolute():
        image = Path(base_dir) / image
    return Path(os.path.abspath(image))


CLIENT_KEYS = ("foreground", "background")


def _from_client_form(case: str, entry: Mapping[str, Any]) -> Mapping[str, Any]:
    """MONAI Label's client form, ``{"foreground": [[i, j, k], ...], "background": [[i, j, k], ...]}`` (voxel
    indices, as its deepgrow and SAM clients send them), -> one object (label 1, or the entry's ``label``) with
    ``points`` / ``point_labels``: the foreground clicks positive, then the background clicks negative."""
    given = [k for k in CLIENT_KEYS if k in entry]
    if not given:
        return entry
    clashing = [k for k in ("objects", "points", "points_world", "point_labels") if k in entry]
    if clashing:
        raise CaseError(f"case {case!r}: give either 'foreground' / 'background' or {clashing[0]!r}, not both")
    clicks: dict[str, list] = {}
    for key in CLIENT_KEYS:
        value = entry.get(key)
        value = [] if value is None else value
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise CaseError(f"case {case!r}: {key!r} must be a list of [i, j, k] voxel indices, got {value!r}")
        clicks[key] = list(value)
    converted = {k: v for k, v in entry.items() if k not in CLIENT_KEYS}
    if not clicks["foreground"] and not clicks["background"] and not any(k in entry for k in BOX_KEYS):
        raise missing_prompt_error(
            f"case {case!r}: 'foreground' and 'background' hold no click (a foreground click places the crop)"
        )
    if clicks["foreground"] or clicks["background"]:
        converted["points"] = clicks["foreground"] + clicks["background"]
        converted["point_labels"] = [1] * len(clicks["foreground"]) + [0] * len(clicks["background"])
    return converted


def parse_case(
    entry: Mapping[str, Any], base_dir: str | os.PathLike | None = None, case: str | None = None
) -> dict[str, Any]:
    """Validate one case and bring it to the normalised form (see the module docstring).

    Args:
        entry: the user's dict.
        base_dir: folder that relative image paths are relative to (default: the working directory).
        case: the case's output name (default: :func:`case_name` of the image, or the entry's ``"case"``).

    Raises:
        CaseError: naming the case and the offending value.
    """
    image = entry_image(entry, base_dir)
    case = case or (safe_name(entry["case"]) if entry.get("case") else case_name(image))
    if not image.exists():
        raise CaseError(f"case {case!r}: image {str(image)!r} does not exist")
    # continuing from an earlier result, negative clicks alone are a valid refinement
    need_positive = not entry.get("prev_mask")
    entry = _from_client_form(case, entry)
    if "objects" in entry:
        if any(k in entry for k in ("points", "points_world")):
            raise CaseError(f"case {case!r}: give either 'objects' or top-level points, not both")
        objects = entry["objects"]
        if not isinstance(objects, Sequence) or not objects:
            raise CaseError(f"case {case!r}: 'objects' must be a non-empty list, got {objects!r}")
        parsed = []
        for i, obj in enumerate(objects):
            if not isinstance(obj, Mapping):
                raise CaseError(f"case {case!r}, object {i}: expected a dict with 'points', got {obj!r}")
            label = check_label(case, f"object {i}", obj.get("label", i + 1))
            parsed.append(_parse_object(case, obj, label, f"object {i} (label {label})", need_positive))
        labels = [obj["label"] for obj in parsed]
        if len(set(labels)) != len(labels):
            raise CaseError(f"case {case!r}: object labels must be distinct, got {labels}")
    else:
        label = check_label(case, "object 0", entry.get("label", 1))
        parsed = [_parse_object(case, entry, label, f"object 0 (label {label})", need_positive)]
    normalised = {"image": str(image), "case": case, "objects": parsed, "modality": str(entry.get("modality", ""))}
    if entry.get("series_uid"):
        normalised["series_uid"] = str(entry["series_uid"])
    if entry.get("prev_mask"):
        prev = Path(str(entry["prev_mask"])).expanduser()
        if base_dir is not None and not prev.is_absolute():
            prev = Path(base_dir) / prev
        if not prev.exists():
            raise CaseError(f"case {case!r}: prev_mask {str(prev)!r} does not exist")
        normalised["prev_mask"] = str(prev)
    return normalised
