"""Dictionary transforms for prompted segmentation: checks, clicks to world space, label maps and saving.

Clicks travel with the image through the invertible MONAI pre-processing as world coordinates (RAS, mm);
MONAI's ``ApplyTransformToPointsd`` maps them to voxel indices of the resampled image afterwards.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelWriter
from monai.transforms import MapTransform

from .data import CaseError, case_name

#: keys the pre-processing adds for the inferer (``PrepareBatchExtraInput`` passes them on).
POINT_COORDS, POINT_LABELS, OBJECT_LABELS = "point_coords", "point_labels", "object_labels"
PROMPT_REQUEST, PROMPT_REPORT = "prompt_request", "prompt_report"


def _source_name(image: Any) -> str:
    meta = getattr(image, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "<in-memory image>"))


class EnsureVolumed(MapTransform):
    """Require a single-channel 3D volume ``(1, D, H, W)`` (after ``EnsureChannelFirstd``)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.ndim != 4 or image.shape[0] != 1:
                spatial = tuple(image.shape[1:]) if image.ndim > 1 else tuple(image.shape)
                kind = f"{len(spatial)}D" if image.ndim != 4 else f"{image.shape[0]}-channel/4D"
                raise CaseError(
                    f"{_source_name(image)}: expected a 3D single-channel image, got a {kind} image of shape "
                    f"{tuple(image.shape)} (channel first)"
                )
        return d


class ClicksToWorldd(MapTransform):
    """Check each object's clicks against the loaded image and express them in world coordinates.

    Reads ``objects`` (see :mod:`custom.data`); writes ``point_coords`` ``(n_objects, n_max, 3)`` (float64,
    RAS mm), ``point_labels`` ``(n_objects, n_max)`` (1, 0, and -1 for padding), ``object_labels``
    ``(n_objects,)``, and ``prompt_request`` (the objects as JSON, for the report).

    Args:
        keys: the image key, whose affine (RAS) and shape define the voxel grid of the given points.
        objects_key: where the parsed objects are.
    """

    def __init__(self, keys: KeysCollection = "image", objects_key: str = "objects") -> None:
        super().__init__(keys)
        self.objects_key = objects_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_key = self.first_key(d)
        image = d[image_key]
        affine = np.asarray(image.affine, dtype=np.float64)
        shape = np.asarray(image.shape[1:])
        objects = d.pop(self.objects_key)
        case = d.get("case", case_name(_source_name(image)))
        n_max = max(len(obj["points"]) for obj in objects)
        coords = np.zeros((len(objects), n_max, 3))
        labels = np.full((len(objects), n_max), -1, dtype=np.int64)
        for i, obj in enumerate(objects):
            points = np.asarray(obj["points"], dtype=np.float64)
            homogeneous = np.c_[points, np.ones(len(points))]
            if obj["space"] == "world":
                voxels = (np.linalg.inv(affine) @ homogeneous.T).T[:, :3]
                world = points
            else:
                voxels = points
                world = (affine @ homogeneous.T).T[:, :3]
            outside = np.any((voxels < -0.5) | (voxels > shape - 0.5), axis=1)
            if outside.any():
                j = int(np.argmax(outside))
                given = obj["points"][j]
                raise CaseError(
                    f"case {case!r}, object label {obj['label']}: point {given} "
                    f"({'mm, RAS' if obj['space'] == 'world' else 'voxels'}) is outside the image "
                    f"(voxel {np.round(voxels[j], 2).tolist()}, image shape {shape.tolist()})"
                )
            coords[i, : len(points)] = world
            labels[i, : len(points)] = obj["point_labels"]
        d[POINT_COORDS] = torch.as_tensor(coords)
        d[POINT_LABELS] = torch.as_tensor(labels)
        d[OBJECT_LABELS] = torch.as_tensor([obj["label"] for obj in objects], dtype=torch.int64)
        d[PROMPT_REQUEST] = json.dumps(objects)
        return d


class ObjectLogitsToLabelMapd(MapTransform):
    """Per-object logits ``(n_objects, D, H, W)`` -> one label map ``(1, D, H, W)``.

    A voxel takes the label of the last object whose logit there is above ``threshold`` (later objects
    overwrite earlier ones, as upstream does for several classes). The inferer's report, if any, moves from
    the prediction's metadata to ``prompt_report``.
    """

    def __init__(self, keys: KeysCollection = "pred", object_labels_key: str = OBJECT_LABELS, threshold: float = 0.0):
        super().__init__(keys)
        self.object_labels_key = object_labels_key
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        object_labels = torch.as_tensor(d[self.object_labels_key]).reshape(-1)
        for key in self.key_iterator(d):
            logits = d[key]
            label_map = torch.zeros((1, *logits.shape[1:]), dtype=torch.int16, device=logits.device)
            for channel, label in enumerate(object_labels.tolist()):
                label_map[0][logits[channel] > self.threshold] = label
            if isinstance(logits, MetaTensor):
                report = logits.meta.pop(PROMPT_REPORT, None)
                if report is not None:
                    d[PROMPT_REPORT] = report
                label_map = MetaTensor(label_map, meta=logits.meta, applied_operations=logits.applied_operations)
            d[key] = label_map
        return d


def _atomic_target(path: Path, suffix: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return tmp


class SaveSegmentationd(MapTransform):
    """Write ``<output_dir>/<case>/<case>_<postfix>.nii.gz`` and a JSON report beside it, each atomically.

    Args:
        keys: the label map to save (on the original grid: after ``Invertd``).
        output_dir: the root folder.
        postfix: file name suffix.
        report_key: the dict to write as ``<case>_<postfix>.json`` (from the inferer), merged with
            ``prompt_request`` (the clicks as given) and ``extra_report``.
        extra_report: constant entries for every report (for example the network and checkpoint).
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = "./eval",
        postfix: str = "seg",
        report_key: str = PROMPT_REPORT,
        extra_report: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.postfix = postfix
        self.report_key = report_key
        self.extra_report = dict(extra_report or {})

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label_map = d[key]
            case = d.get("case") or case_name(_source_name(label_map))
            folder = self.output_dir / case
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{case}_{self.postfix}.nii.gz"
            tmp = _atomic_target(target, ".nii.gz")
            try:
                writer = NibabelWriter(output_dtype=np.int16)
                writer.set_data_array(label_map, channel_dim=0, squeeze_end_dims=True)
                writer.set_metadata({"affine": label_map.affine, "original_affine": label_map.affine}, resample=False)
                writer.write(tmp, verbose=False)
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
            report = dict(self.extra_report)
            report.update(json.loads(d[self.report_key]) if isinstance(d.get(self.report_key), str) else {})
            if PROMPT_REQUEST in d:  # each object: the clicks as given, then what the inferer did with them
                requested = json.loads(d[PROMPT_REQUEST])
                done = report.get("objects", [{}] * len(requested))
                report["objects"] = [dict(given, **used) for given, used in zip(requested, done)]
            report.update(image=_source_name(d.get("image", label_map)), segmentation=str(target))
            json_target = folder / f"{case}_{self.postfix}.json"
            tmp = _atomic_target(json_target, ".json")
            try:
                with open(tmp, "w") as handle:
                    json.dump(report, handle, indent=2)
                os.replace(tmp, json_target)
            finally:
                Path(tmp).unlink(missing_ok=True)
            d[f"{key}_saved_to"] = str(target)
        return d
