"""Dictionary transforms for prompted segmentation: loading (readers in :mod:`custom.io`), checks, clicks to voxel
indices, training windows, label maps and saving (writers in :mod:`custom.io`).

Clicks are checked against the image and passed on as voxel indices of its stored grid; the predictor
(:mod:`custom.predictor`) maps them to the network's grid and pastes its masks back.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import LoadImaged, MapTransform, Randomizable
from monai.utils import ensure_tuple_rep

from .cases import CaseError, case_name, missing_prompt_error, safe_name
from .files import inside_folder, write_atomic, write_text_atomic
from .io import (
    INPUT_NOTES,
    _check_dicom_source,
    _check_path,
    _source_name,
    as_label_map,
    check_output_ext,
    load_volume,
    read_npz_case,
    write_label_map,
)
from .object_prompts import PROMPTS_META, CasePrompts, object_prompts, world_to_voxel
from .prompts import mask_box
from .window import extract_window

logger = logging.getLogger(__name__)


#: where the inferer leaves its report (JSON, one per volume) in the prediction's metadata
PROMPT_REPORT = "prompt_report"


#: set in a prediction's metadata when the inferer reported its case as failed (nothing is saved for it)
PROMPT_FAILED = "prompt_failed"


class LoadVolumed(LoadImaged):
    """MONAI's ``LoadImaged`` (so MONAI Label still wraps it) with :func:`load_volume`'s checks before reading:
    the header's shape against ``max_grid_voxels`` and memory, RGB, zero voxel sizes, NRRD spaces, the DICOM
    series (``series_key`` of the item picks one of several) and its slice spacing. NRRD and DICOM are read by
    ITK whatever else is installed.

    Args:
        keys: the image keys.
        max_grid_voxels, spacing_mm: as :class:`~custom.predictor.VolumetricPredictor`'s (None: memory only).
        series_key: the item's key of a DICOM SeriesInstanceUID.
        kwargs: ``LoadImaged``'s.
    """

    def __init__(
        self,
        keys: KeysCollection,
        max_grid_voxels: int | None = None,
        spacing_mm: Sequence[float] | float | None = None,
        series_key: str = "series_uid",
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, **kwargs)
        self.max_grid_voxels = max_grid_voxels
        self.spacing_mm = spacing_mm
        self.series_key = series_key

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            declared = None
            if isinstance(d[key], (str, os.PathLike)):
                declared = _check_path(d[key], d.get(self.series_key), self.max_grid_voxels, self.spacing_mm)
            loaded = self._loader(d[key], declared.reader if declared and declared.reader else reader)
            notes = json.dumps(declared.notes if declared else {})
            if self._loader.image_only:
                d[key] = loaded
            else:
                d[key], meta = loaded
                meta[INPUT_NOTES] = notes
                d[meta_key or f"{key}_{meta_key_postfix}"] = meta
            if isinstance(d[key], MetaTensor):
                d[key].meta[INPUT_NOTES] = notes
        return d


class EnsureVolumed(MapTransform):
    """Require a single-channel 3D volume ``(1, D, H, W)`` (after ``EnsureChannelFirstd``) with finite values
    that are not all the same: a NaN or Inf voxel would silently empty the prediction of every window it
    falls in, and a constant image holds nothing to segment."""

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
            values = torch.as_tensor(image.as_tensor() if isinstance(image, MetaTensor) else image)
            if values.is_floating_point():
                bad = int((~torch.isfinite(values)).sum())
                if bad:
                    raise CaseError(
                        f"{_source_name(image)}: {bad:,} of {values.numel():,} voxels are NaN or infinite; "
                        "replace them (for example with the background value) before segmenting"
                    )
            low, high = values.min(), values.max()
            if low == high:
                raise CaseError(f"{_source_name(image)}: every voxel is {float(low)}: nothing to segment")
        return d


class LoadCased(MapTransform):
    """Load a labelled case, channel first: the image (float32) and the label (int16, :func:`as_label_map`) with
    :func:`load_volume`'s checks, or a ``.npz`` case in the CVPR 2025 challenge's format (``imgs`` (D, H, W),
    ``spacing`` (x, y, z) as SimpleITK gives it, ``gts`` the label, optional ``boxes``, kept as JSON under
    ``challenge_boxes``), which has no direction: array axis 0 is taken along world z, 1 along y, 2 along x.

    Args:
        keys: the image and the label keys.
        max_grid_voxels, spacing_mm: the predictor's grid limit and spacing, checked from the headers before any
            voxel is read (None: memory is the only limit).
        series_key: the item's key of a DICOM SeriesInstanceUID.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        max_grid_voxels: int | None = None,
        spacing_mm: Sequence[float] | float | None = None,
        series_key: str = "series_uid",
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.max_grid_voxels = max_grid_voxels
        self.spacing_mm = spacing_mm
        self.series_key = series_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_key, label_key = (list(self.keys) + [None])[:2]
        source = str(d[image_key])
        checks = {"max_grid_voxels": self.max_grid_voxels, "spacing_mm": self.spacing_mm}
        if source.lower().endswith(".npz"):
            d.update(read_npz_case(source, image_key, label_key, **checks))
            return d
        d[image_key] = load_volume(source, d.get(self.series_key), **checks)
        if label_key in d:
            label = str(d[label_key])
            d[label_key] = as_label_map(load_volume(label, dtype=None), label)
        return d


class LoadPrevMaskd(MapTransform):
    """Load an earlier label map (``prev_mask``) when the case has one, channel first and as int16
    (:func:`as_label_map`), with :func:`load_volume`'s checks: a transform of its own rather than a second
    ``LoadImaged`` with a missing key, which MONAI Label's loader wrapper does not allow."""

    def __init__(self, keys: KeysCollection = "prev_mask") -> None:
        super().__init__(keys, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], (str, os.PathLike)):
                d[key] = as_label_map(load_volume(d[key], dtype=None), str(d[key]))
        return d


class MatchPrevMaskd(MapTransform):
    """After the spatial pre-processing: check that an earlier mask (``prev_mask``) matches its image (same
    stored shape and, resampled alike, the same grid); give cases without one an empty tensor, so that every
    batch carries the key."""

    def __init__(self, keys: KeysCollection = "prev_mask", image_key: str = "image") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        for key in self.keys:
            if key not in d:
                d[key] = torch.zeros(0)
                continue
            stored = [tuple(np.asarray(x.meta.get("spatial_shape", x.shape[1:])).tolist()) for x in (d[key], image)]
            if stored[0] != stored[1] or tuple(d[key].shape) != tuple(image.shape):
                raise CaseError(
                    f"{_source_name(d[key])}: prev_mask of shape {stored[0]} does not match its image "
                    f"{_source_name(image)} of shape {stored[1]} (or lies on another grid)"
                )
        return d


class ClientPromptsd(MapTransform):
    """Clicks as interactive clients send them (MONAI Label, 3D Slicer) -> this bundle's ``objects``.

    Accepted, when the item has no ``objects`` yet (voxel indices of the image as stored):

    - ``{"foreground": [[i, j, k], ...], "background": [[i, j, k], ...]}`` (MONAI Label's deepgrow and SAM
      clients): one object, its positive and negative clicks;
    - label-name keys as MONAI Label's deepedit sends them, ``{"liver": [[...]], "spleen": [[...]],
      "background": [[...]]}``: one object per name with clicks, label values from ``label_names`` (else 1,
      2, ... in the order given); the ``background`` clicks are negative clicks of every object.

    Args:
        keys: the image key (only to name the case in errors).
        label_names: name -> label value for deepedit-style keys.
        objects_key: where the objects go (then checked by :class:`ClicksToVoxelsd`).
    """

    RESERVED = frozenset({"image", "label", "foreground", "background", "objects", "case", "modality", "prev_mask"})

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_names: Mapping[str, int] | None = None,
        objects_key: str = "objects",
    ) -> None:
        super().__init__(keys)
        self.label_names = {str(k).lower(): int(v) for k, v in (label_names or {}).items()}
        self.objects_key = objects_key

    @staticmethod
    def _points(value: Any) -> list[list[float]] | None:
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if not isinstance(value, Sequence) or isinstance(value, str) or not value:
            return None
        if not all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 3 for p in value):
            return None
        return [[float(c) for c in p] for p in value]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.objects_key in d:
            return d
        negatives = self._points(d.get("background")) or []
        named = {
            str(k): points
            for k, v in d.items()
            if isinstance(k, str) and k.lower() not in self.RESERVED and (points := self._points(v)) is not None
        }
        objects = []
        if self._points(d.get("foreground")):
            named = {"foreground": self._points(d["foreground"])}
        for index, (name, positives) in enumerate(named.items(), start=1):
            value = self.label_names.get(name.lower(), 1 if name == "foreground" else index)
            objects.append(
                {
                    "label": value,
                    "name": name,
                    "points": positives + negatives,
                    "point_labels": [1] * len(positives) + [0] * len(negatives),
                    "space": "voxel",
                }
            )
        if not objects:
            raise missing_prompt_error(
                f"{_source_name(d.get(self.first_key(d)))}: no clicks: expected 'objects', or 'foreground' / "
                "'background' voxel lists, or label-name keys with voxel lists"
            )
        d[self.objects_key] = objects
        d.setdefault("case", case_name(_source_name(d.get(self.first_key(d)))))
        return d


class ClicksToVoxelsd(MapTransform):
    """Check each object's clicks and box against the loaded image and express them as voxel indices of its stored
    grid: ``objects`` (parsed, see :mod:`custom.data`) becomes a :class:`~custom.object_prompts.CasePrompts` of
    :class:`~custom.object_prompts.ObjectPrompts`, the one form the prompts keep up to the predictor. The same
    tuple is left in the image's metadata (``prompted_objects``) for an inferer called as ``inferer(image,
    network)``, as MONAI Label does.

    Args:
        keys: the image key, whose affine and shape define the stored grid.
        objects_key: where the parsed objects are, and where their checked form goes.
        max_clicks_per_object: more clicks on one object are refused (each is a prompt step: 1,000 clicks take
            half a minute).
    """

    def __init__(
        self, keys: KeysCollection = "image", objects_key: str = "objects", max_clicks_per_object: int = 100
    ) -> None:
        super().__init__(keys)
        self.objects_key = objects_key
        if int(max_clicks_per_object) < 1:
            raise ValueError(f"max_clicks_per_object must be >= 1, got {max_clicks_per_object!r}")
        self.max_clicks_per_object = int(max_clicks_per_object)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.first_key(d)]
        affine = np.asarray(image.affine, dtype=np.float64)
        case = d.get("case", case_name(_source_name(image)))
        prompts = []
        for obj in d[self.objects_key]:
            where = f"case {case!r}, object label {obj['label']}"
            if len(obj["points"]) > self.max_clicks_per_object:
                raise CaseError(
                    f"{where}: {len(obj['points']):,} clicks, more than max_clicks_per_object="
                    f"{self.max_clicks_per_object} (each click is a prompt step); give fewer, or raise the limit"
                )
            prompts.append(object_prompts(obj, affine, image.shape[1:], where))
        d[self.objects_key] = CasePrompts(tuple(prompts))
        if isinstance(image, MetaTensor):
            image.meta[PROMPTS_META] = d[self.objects_key]
        return d


class SaveSegmentationd(MapTransform):
    """Write ``<output_dir>/<case>/<case>_<postfix><output_ext>`` and a JSON report beside it, each atomically,
    and with ``preview`` a picture of it, ``<case>_<postfix>.png`` (:mod:`custom.preview`); a case folder that is
    a link leading out of ``output_dir`` is refused. The report adds the image's :data:`INPUT_NOTES` (the DICOM
    series read, orientations assumed).

    Args:
        keys: the label map to save, on the stored grid of its image.
        output_dir: the root folder.
        postfix: file name suffix.
        report_key: the dict to write as ``<case>_<postfix>.json`` (from the inferer), merged with
            each object as requested (``objects``) and ``extra_report``.
        extra_report: constant entries for every report (for example the network and checkpoint).

    (MONAI's ``SaveImaged`` writes the image alone through a writer class; this adds the DICOM-SEG on the source
    series, the report and the preview, each written atomically, and the case-folder check.)
        output_ext: one of :data:`OUTPUT_EXTENSIONS` (``.dcm``: a DICOM-SEG, for DICOM series input only).
        labels_file: the label table (``docs/labels.json``): names and colours of the DICOM-SEG's segments and
            of the preview's outlines (None: ``object <value>`` in default colours).
        preview: also write the preview PNG.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = "./eval",
        postfix: str = "seg",
        report_key: str = PROMPT_REPORT,
        extra_report: Mapping[str, Any] | None = None,
        output_ext: str = ".nii.gz",
        labels_file: str | os.PathLike | None = None,
        preview: bool = False,
    ) -> None:
        super().__init__(keys)
        from .labels import LabelTable

        self.output_dir = Path(output_dir)
        self.postfix = postfix
        self.report_key = report_key
        self.extra_report = dict(extra_report or {})
        self.output_ext = check_output_ext(output_ext)
        self.labels = LabelTable.load(labels_file)
        self.preview = bool(preview)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label_map = d[key]
            if isinstance(label_map, MetaTensor) and label_map.meta.get(PROMPT_FAILED):
                continue  # the inferer reported this case as failed: nothing is written for it
            case = safe_name(d.get("case") or case_name(_source_name(label_map)))
            folder = inside_folder(self.output_dir, case)  # a link there to elsewhere is refused
            target = folder / f"{case}_{self.postfix}{self.output_ext}"
            image = d.get("image", label_map)
            source = _source_name(image)
            notes = getattr(image, "meta", {}).get(INPUT_NOTES) or "{}"
            notes = json.loads(notes[0] if isinstance(notes, (list, tuple)) else notes)
            if self.output_ext == ".dcm":
                _check_dicom_source(source, case)
            series = d.get("series_uid") or notes.get("dicom_series_uid")
            prompts = d.get("objects")
            objects = prompts.objects if isinstance(prompts, CasePrompts) else ()
            clicks = {obj.label: obj.clicks for obj in objects}
            write_atomic(
                target,
                lambda path: write_label_map(
                    label_map, path, like=source, labels=self.labels, series_uid=series, objects=list(clicks)
                ),
            )
            report = dict(self.extra_report)
            inferred = label_map.meta.pop(self.report_key, None) if isinstance(label_map, MetaTensor) else None
            inferred = d.get(self.report_key, inferred)
            report.update(json.loads(inferred) if isinstance(inferred, str) else {})
            if objects:  # each object: the clicks as given, then what the predictor did with them
                done = report.get("objects", [{}] * len(objects))
                report["objects"] = [dict(obj.given, **used) for obj, used in zip(objects, done)]
            report.update(notes)
            report.update(image=source, segmentation=str(target))
            if self.preview:
                from .preview import write_preview

                picture = target.parent / f"{case}_{self.postfix}.png"
                modality = str(d.get("modality") or notes.get("dicom_modality") or "")
                write_preview(picture, image, label_map, self.labels, clicks, modality)
                report["preview"] = str(picture)
            report_path = target.parent / f"{case}_{self.postfix}.json"
            write_text_atomic(report_path, json.dumps(report, indent=2, default=str))
            logger.info(f"{case}: wrote {target} and {report_path}")
            d[f"{key}_saved_to"] = str(target)
        return d


class LabelClassesd(MapTransform):
    """List the classes a label map holds (``classes``: values > 0 with at least ``min_voxels`` voxels) and keep
    the label as uint8 (a quarter of float32's memory in a cache): plain ``{"image", "label"}`` entries (as
    MONAI Label and MONAI FL pass them) need nothing else.

    Raises:
        CaseError: the label has no class, or values that are not integers in 0..255 (naming the file).
    """

    def __init__(self, keys: KeysCollection = "label", classes_key: str = "classes", min_voxels: int = 1) -> None:
        super().__init__(keys)
        self.classes_key = classes_key
        self.min_voxels = min_voxels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            values = torch.as_tensor(label.as_tensor() if isinstance(label, MetaTensor) else label)
            present, counts = torch.unique(values, return_counts=True)
            if present.min() < 0 or present.max() > 255 or not torch.equal(present, present.round()):
                raise CaseError(
                    f"{_source_name(label)}: label values must be integers in 0..255, found {present.tolist()[:10]}"
                )
            classes = [int(v) for v, n in zip(present.tolist(), counts.tolist()) if v > 0 and n >= self.min_voxels]
            if not classes:
                raise CaseError(f"{_source_name(label)}: the label has no class of at least {self.min_voxels} voxels")
            d[self.classes_key] = classes
            d[key] = label.to(torch.uint8)
        return d


class SelectTargetd(MapTransform, Randomizable):
    """Turn a label map into one binary target: the class in ``target_class_key`` if the item has it,
    otherwise a class drawn among ``classes_key`` (the classes present, :class:`LabelClassesd`).

    Writes the target (uint8 0/1) to the label key and the class to ``target_class_key``.
    """

    def __init__(
        self, keys: KeysCollection = "label", classes_key: str = "classes", target_class_key: str = "target_class"
    ) -> None:
        MapTransform.__init__(self, keys)
        self.classes_key = classes_key
        self.target_class_key = target_class_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        classes = list(d.pop(self.classes_key, []))  # lists of varying length would not collate
        target_class = d.get(self.target_class_key)
        if target_class is None:
            if not classes:
                raise CaseError(f"{_source_name(d.get(self.first_key(d)))}: no class to draw a target from")
            target_class = classes[int(self.R.randint(len(classes)))]
        d[self.target_class_key] = int(target_class)
        for key in self.key_iterator(d):
            d[key] = (d[key] == int(target_class)).to(torch.uint8)
        return d


def _crop_around(d: dict, keys: Sequence[Hashable], centre: np.ndarray, roi_size: int, spacing_mm: np.ndarray) -> None:
    """Crop every key of ``d``, on its own grid, to the region that becomes a ``roi_size^3`` window at ``spacing_mm``
    once resampled, centred on ``centre`` (voxel indices of that grid); outside the image is zero-padded and the
    affine updated, so that ``Spacingd`` and ``ResizeWithPadOrCropd(roi_size)`` finish the window."""
    first = d[keys[0]]
    pixdim = affine_to_spacing(np.asarray(first.affine, np.float64))
    sizes = np.ceil(roi_size * spacing_mm / pixdim).astype(int) + 2
    start = np.round(centre - sizes / 2).astype(int)
    for key in keys:
        image = d[key]
        affine = torch.as_tensor(image.affine, dtype=torch.float64).clone()
        affine[:3, 3] = affine[:3, :3] @ torch.as_tensor(start, dtype=torch.float64) + affine[:3, 3]
        crop = extract_window(image, start.tolist(), sizes.tolist())
        d[key] = MetaTensor(crop, affine=affine, meta={k: v for k, v in image.meta.items() if k != "affine"})


class CropAroundTargetd(MapTransform, Randomizable):
    """Crop, on the image's own grid, the region that becomes a ``roi_size^3`` window at ``spacing_mm`` once
    resampled, centred on the target's bounding box plus a uniform jitter of up to ``jitter_mm`` per axis.

    Cropping before resampling keeps training on large CT cheap. Outside the image is zero-padded; the
    affine is updated, so a following ``Spacingd`` and ``ResizeWithPadOrCropd(roi_size)`` finish the window.

    Args:
        keys: image and label keys.
        label_key: the binary target whose bounding box centres the crop.
        roi_size: window side after resampling (voxels).
        spacing_mm: the resampled voxel size (mm), one per axis or one for all.
        jitter_mm: half-width of the uniform jitter of the centre (0 for validation).
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        roi_size: int = 128,
        spacing_mm: Sequence[float] | float = 1.5,
        jitter_mm: float = 0.0,
    ) -> None:
        MapTransform.__init__(self, keys)
        self.label_key = label_key
        self.roi_size = roi_size
        self.spacing_mm = np.asarray(ensure_tuple_rep(spacing_mm, 3), dtype=np.float64)
        self.jitter_mm = jitter_mm

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        box = mask_box(torch.as_tensor(label)[0] > 0)
        if box is None:
            raise ValueError(f"{_source_name(label)}: the selected target has no voxel")
        centre = np.array([(lo + hi - 1) / 2 for lo, hi in box], dtype=np.float64)
        voxel_mm = affine_to_spacing(np.asarray(label.affine, np.float64))
        centre = centre + self.R.uniform(-self.jitter_mm, self.jitter_mm, 3) / voxel_mm
        _crop_around(d, list(self.key_iterator(d)), centre, self.roi_size, self.spacing_mm)
        return d


class CropAroundClickd(MapTransform, Randomizable):
    """A training window placed as inference places it, or off-centre: the first click is drawn uniformly among
    the target's voxels (as the evaluation protocols draw it), and the window is centred on it with probability
    ``centre_probability`` (inference centres the window on the first click), otherwise on the click plus a
    uniform offset of up to ``max_offset_mm`` per axis, so that the window's centre does not say which structure
    is meant and only the prompts do.

    Crops on the image's own grid as :class:`CropAroundTargetd` does, and writes the click's world coordinates to
    ``click_key`` (``(3,)`` float64, the image affine's space); :class:`WorldPointToVoxeld` turns them into
    window voxel indices after the spatial transforms.

    Args:
        keys: image and label keys.
        label_key: the binary target.
        roi_size: window side after resampling (voxels).
        spacing_mm: the resampled voxel size (mm), one per axis or one for all.
        centre_probability: how often the window is centred on the click.
        max_offset_mm: half-width of the uniform offset otherwise; at most half the window minus one voxel, so
            that the click stays inside.
        click_key: where the click's world coordinates go.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        roi_size: int = 64,
        spacing_mm: Sequence[float] | float = 1.5,
        centre_probability: float = 0.3,
        max_offset_mm: float = 24.0,
        click_key: str = "first_click_world",
    ) -> None:
        MapTransform.__init__(self, keys)
        half_window_mm = (roi_size / 2 - 1) * min(ensure_tuple_rep(spacing_mm, 3))
        if not 0 <= max_offset_mm <= half_window_mm:
            raise ValueError(
                f"max_offset_mm={max_offset_mm} must lie in [0, {half_window_mm}] (the click stays inside)"
            )
        if not 0 <= centre_probability <= 1:
            raise ValueError(f"centre_probability must lie in [0, 1], got {centre_probability}")
        self.label_key = label_key
        self.roi_size = roi_size
        self.spacing_mm = np.asarray(ensure_tuple_rep(spacing_mm, 3), dtype=np.float64)
        self.centre_probability = centre_probability
        self.max_offset_mm = max_offset_mm
        self.click_key = click_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        foreground = torch.nonzero(torch.as_tensor(label)[0] > 0)
        if len(foreground) == 0:
            raise ValueError(f"{_source_name(label)}: the selected target has no voxel")
        click = foreground[int(self.R.randint(len(foreground)))].double().numpy()
        offset_mm = np.zeros(3)
        if self.R.uniform() >= self.centre_probability:
            offset_mm = self.R.uniform(-self.max_offset_mm, self.max_offset_mm, 3)
        affine = np.asarray(label.affine, np.float64)
        d[self.click_key] = torch.as_tensor(affine[:3, :3] @ click + affine[:3, 3])
        _crop_around(
            d, list(self.key_iterator(d)), click + offset_mm / affine_to_spacing(affine), self.roi_size, self.spacing_mm
        )
        return d


class WorldPointToVoxeld(MapTransform):
    """A point's world coordinates (``keys``, ``(3,)``) -> voxel indices of ``image_key``'s grid as it is now
    (after resampling, cropping and flips, which keep the affine up to date), written to ``output_key``."""

    def __init__(self, keys: KeysCollection, image_key: str = "image", output_key: str = "first_click") -> None:
        super().__init__(keys, allow_missing_keys=True)  # windows placed otherwise carry no click
        self.image_key = image_key
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        affine = np.asarray(d[self.image_key].affine, np.float64)
        for key in self.key_iterator(d):
            voxel = world_to_voxel(d.pop(key), affine)[0]
            d[self.output_key] = torch.as_tensor(voxel, dtype=torch.float32)
        return d
