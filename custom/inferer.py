"""MONAI inferers: :class:`PromptedInferer` runs the volumetric predictor inside an engine (prompted
inference, click-simulating evaluation and validation), :class:`AutocastInferer` puts any inferer under
autocast."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import nn

from .precision import autocast, check_autocast_dtype
from .predictor import VolumetricPredictor
from .prompts import check_click_memory
from .transforms import PROMPT_FAILED, PROMPT_REPORT, PROMPTS_META
from .window import normalize_crop


@dataclass
class _Kept:
    """A predictor kept by :class:`PredictorCache`, and what each of its objects was given so far."""

    predictor: VolumetricPredictor
    network: nn.Module
    # object label -> (earlier-mask signature, box signature, clicks applied as ((i, j, k), positive))
    applied: dict[int, tuple[str | None, tuple | None, list[tuple[tuple[float, ...], bool]]]] = field(
        default_factory=dict
    )


@dataclass
class _ObjectPrompts:
    """What one object of one volume is given, taken once from the batch tensors for both ways of segmenting."""

    label: int
    earlier: torch.Tensor | None  # (D, H, W) bool, the object's region of an earlier label map
    box: tuple[float, ...] | None  # min corner then max corner, stored-grid voxels
    clicks: list[tuple[tuple[float, ...], bool]]  # (voxel, positive), in the order given


def _volume_prompts(
    b: int,
    point_coords: torch.Tensor,
    point_labels: torch.Tensor,
    object_labels: torch.Tensor,
    prev_mask: torch.Tensor | None,
    boxes: torch.Tensor | None,
) -> list[_ObjectPrompts]:
    """Volume ``b``'s objects from the batch tensors of :meth:`PromptedInferer.__call__` (padding dropped)."""
    objects = []
    for index, label in enumerate(int(label) for label in object_labels[b].tolist()):
        earlier = None
        if prev_mask is not None and prev_mask.numel() > 0:
            earlier = torch.as_tensor(prev_mask[b, 0]) == label
            earlier = earlier if earlier.any() else None
        box = None
        if boxes is not None and boxes.numel() > 0 and not torch.isnan(boxes[b, index]).any():
            box = tuple(boxes[b, index].flatten().tolist())
        valid = point_labels[b, index] >= 0
        points, marks = point_coords[b, index][valid].tolist(), point_labels[b, index][valid].tolist()
        objects.append(_ObjectPrompts(label, earlier, box, [(tuple(p), bool(m)) for p, m in zip(points, marks)]))
    return objects


def _give(predictor: VolumetricPredictor, key: Any, prompts: _ObjectPrompts) -> None:
    """Give an object its earlier mask, box and clicks, in that order."""
    if prompts.earlier is not None:
        predictor.set_mask(key, prompts.earlier)
    if prompts.box is not None:
        predictor.add_box(key, prompts.box[:3], prompts.box[3:])
    for point, positive in prompts.clicks:
        predictor.add_click(key, point, positive)


class PredictorCache:
    """Predictors kept across calls of a :class:`PromptedInferer`, one per image, for interactive servers.

    An interactive client (MONAI Label, 3D Slicer) sends every click of an object again with each request. A
    predictor kept from the previous request of the same image already holds the image on the network grid,
    the window embeddings (the costly part: one encoder pass per window) and each object's clicks, so a
    further click costs one prompt step (a decoder pass) instead of re-encoding the image and replaying every
    click.

    A predictor is found again under the image's file (real path, modification time in ns, size in bytes:
    a file rewritten in place is a new image), its modality, the network *object* (MONAI Label builds a new
    one when ``model.pt`` changes) and the inferer's settings. Images without a file behind them are not kept.

    Bounded to ``max_images`` predictors, least recently used dropped first: each holds its image on the
    network grid (float32) and up to ``max_cached_embeddings`` window embeddings, some hundred MB for a CT
    scan, and a labelling session works on one image at a time (two let a user go back to the previous one).

    Calls through one cache run one at a time (a predictor is not thread-safe).
    """

    def __init__(self, max_images: int = 2) -> None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.max_images = max_images
        self.lock = threading.RLock()
        self._kept: OrderedDict[tuple, _Kept] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._kept)

    @staticmethod
    def image_key(source: Any) -> tuple[str, int, int] | None:
        """``(real path, mtime_ns, size)`` of an image file or DICOM folder; None if there is none."""
        if not isinstance(source, (str, os.PathLike)) or not os.path.exists(source):
            return None
        stat = os.stat(source)
        return os.path.realpath(source), stat.st_mtime_ns, stat.st_size

    def get(self, key: tuple, network: nn.Module) -> _Kept | None:
        kept = self._kept.get(key)
        if kept is None or kept.network is not network:
            self.misses += 1
            return None
        self._kept.move_to_end(key)
        self.hits += 1
        return kept

    def put(self, key: tuple, kept: _Kept) -> None:
        self._kept[key] = kept
        self._kept.move_to_end(key)
        while len(self._kept) > self.max_images:
            self._kept.popitem(last=False)

    def discard(self, key: tuple) -> None:
        self._kept.pop(key, None)

    def clear(self) -> None:
        with self.lock:
            self._kept.clear()


class PromptedInferer(Inferer):
    """The settings of a :class:`~custom.predictor.VolumetricPredictor`, and an inferer that segments the
    prompted objects of a batch of stored-grid volumes with it.

    Args:
        spacing_mm: the network grid's voxel size.
        roi_size, stride, max_windows, click_memory, reuse_margin, autocast_dtype, sigma_scale,
        intensity_normalization, intensity_clamp_by_modality, prev_mask_logit, max_cached_embeddings,
        max_grid_voxels: see :class:`~custom.predictor.VolumetricPredictor`.
        failures: an object with ``report_failure(message)`` (the run's case list): a volume that fails is
            reported there, flagged in its prediction's metadata (``prompt_failed``, so that nothing is saved
            for it) and the others go on; None: the error propagates.
        predictor_cache: keep one predictor per image across calls (:class:`PredictorCache`, for interactive
            servers: a further click on the same image is not re-encoded); None (the command line): a new
            predictor per call.
    """

    def __init__(
        self,
        spacing_mm: Sequence[float] | float = 1.5,
        roi_size: int | None = None,
        stride: int | None = None,
        max_windows: int = 8,
        click_memory: str = "newest",
        reuse_margin: int = 16,
        autocast_dtype: str | None = None,
        sigma_scale: float = 0.125,
        intensity_normalization: Callable[[torch.Tensor], torch.Tensor] | None = normalize_crop,
        intensity_clamp_by_modality: Mapping[str, Sequence[float]] | None = None,
        prev_mask_logit: float = 4.0,
        max_cached_embeddings: int = 32,
        max_grid_voxels: int = 2**28,
        failures: Any = None,
        predictor_cache: PredictorCache | None = None,
    ) -> None:
        super().__init__()
        self.failures = failures
        self.predictor_cache = predictor_cache
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        self.settings = dict(
            spacing_mm=spacing_mm,
            roi_size=roi_size,
            stride=stride,
            max_windows=max_windows,
            click_memory=check_click_memory(click_memory),
            reuse_margin=reuse_margin,
            autocast_dtype=check_autocast_dtype(autocast_dtype),
            sigma_scale=sigma_scale,
            intensity_normalization=intensity_normalization,
            intensity_clamp_by_modality=intensity_clamp_by_modality,
            prev_mask_logit=prev_mask_logit,
            max_cached_embeddings=max_cached_embeddings,
            max_grid_voxels=max_grid_voxels,
        )

    def predictor(self, network: nn.Module) -> VolumetricPredictor:
        """A predictor with these settings for ``network``."""
        return VolumetricPredictor(network, **self.settings)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        *args: Any,
        object_labels: torch.Tensor | None = None,
        prev_mask: torch.Tensor | None = None,
        modality: Sequence[str] | str | None = None,
        case: Sequence[str] | str | None = None,
        boxes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Label maps on the stored grid for a batch of volumes.

        Args:
            inputs: ``(B, 1, D, H, W)`` images as stored (MetaTensor: the affine defines the grid).
            network: the promptable network.
            point_coords: ``(B, n_objects, n_max, 3)`` voxel indices of the stored grid, array order; None: the
                prompts :class:`~custom.transforms.ClicksToVoxelsd` left in the image's metadata (an inferer
                called as ``inferer(inputs, network)``, as MONAI Label does).
            point_labels: ``(B, n_objects, n_max)``: 1 positive, 0 negative, -1 padding.
            object_labels: ``(B, n_objects)`` label of each object (default 1, 2, ...).
            prev_mask: ``(B, 1, D, H, W)`` an earlier label map to continue from (an empty tensor or None:
                none): each object continues from its own label's region.
            modality: per volume (chooses the intensity clamping).
            case: per volume, the name failures are reported under.
            boxes: ``(B, n_objects, 2, 3)`` each object's box (min and max corner, stored-grid voxels; NaN: none),
                given before its clicks.

        Returns:
            ``(B, 1, D, H, W)`` int16 label maps (where objects overlap, the higher logit wins), a MetaTensor with the
            input's metadata and, under ``prompt_report``, one JSON report per volume (``prompt_failed``: which
            volumes failed).
        """
        if not isinstance(inputs, MetaTensor):
            raise TypeError("PromptedInferer needs the images as MetaTensors (their affines define the grids)")
        batch = inputs.shape[0]
        if point_coords is None:
            point_coords, point_labels, boxes, object_labels = self._prompts_from_metadata(inputs)
        if object_labels is None:
            object_labels = torch.arange(1, point_coords.shape[1] + 1).expand(batch, -1)
        per_volume = [
            [value] * batch if value is None or isinstance(value, str) else list(value) for value in (modality, case)
        ]
        affines = inputs.affine if inputs.affine.ndim == 3 else inputs.affine[None].expand(batch, -1, -1)
        names = inputs.meta.get("filename_or_obj")
        predictor = self.predictor(network) if self.predictor_cache is None else None
        outputs, reports, failed = [], [], []
        network.eval()
        for b in range(batch):
            name = names[b] if isinstance(names, (list, tuple)) else names
            image = MetaTensor(inputs[b].as_tensor(), affine=affines[b], meta={"filename_or_obj": name or "<image>"})
            try:
                objects = _volume_prompts(b, point_coords, point_labels, object_labels, prev_mask, boxes)
                modality_b = str(per_volume[0][b] or "")
                if predictor is not None:
                    label_map, report = self._segment(predictor, image, objects, modality_b)
                else:
                    label_map, report = self._segment_kept(network, image, objects, modality_b)
            except Exception as err:  # one bad case must not stop the others
                if self.failures is None:
                    raise
                self.failures.report_failure(f"case {per_volume[1][b] or name!r}: {type(err).__name__}: {err}")
                label_map, report = torch.zeros((1, *inputs.shape[2:]), dtype=torch.int16), {"failed": str(err)}
            failed.append("failed" in report)
            outputs.append(label_map)
            reports.append(json.dumps(report))
        result = MetaTensor(torch.stack(outputs), meta=dict(inputs.meta))
        result.is_batch = inputs.is_batch
        result.meta[PROMPT_REPORT] = reports
        result.meta[PROMPT_FAILED] = failed
        return result

    @staticmethod
    def _prompts_from_metadata(inputs: MetaTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        stored = inputs.meta.get(PROMPTS_META)
        if stored is None:
            raise ValueError(
                "no prompts: pass point_coords and point_labels, or prepare the image with "
                "custom.transforms.ClicksToVoxelsd, which leaves them in its metadata"
            )
        per_volume = [json.loads(s) for s in (stored if isinstance(stored, (list, tuple)) else [stored])]
        if len(per_volume) != inputs.shape[0]:
            per_volume = per_volume * inputs.shape[0]
        n_objects = max(len(p["object_labels"]) for p in per_volume)
        n_max = max(len(points) for p in per_volume for points in p["point_coords"])
        coords = torch.zeros(len(per_volume), n_objects, n_max, 3)
        labels = torch.full((len(per_volume), n_objects, n_max), -1, dtype=torch.long)
        boxes = torch.full((len(per_volume), n_objects, 2, 3), float("nan"))
        objects = torch.zeros(len(per_volume), n_objects, dtype=torch.long)
        for b, prompts in enumerate(per_volume):
            for i, (points, marks) in enumerate(zip(prompts["point_coords"], prompts["point_labels"])):
                coords[b, i, : len(points)] = torch.tensor(points)
                labels[b, i, : len(marks)] = torch.tensor(marks)
            for i, box in enumerate(prompts.get("boxes", [])):
                if box is not None:
                    boxes[b, i] = torch.tensor(box)
            objects[b, : len(prompts["object_labels"])] = torch.tensor(prompts["object_labels"])
        return coords, labels, boxes, objects

    def _segment_kept(
        self, network: nn.Module, image: MetaTensor, objects: list[_ObjectPrompts], modality: str
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """:meth:`_segment` with the image's predictor from :attr:`predictor_cache`: an object whose clicks
        include all those it was given before (and the same earlier mask and box) gets only the new ones; any
        other object is reset and given all its clicks again (the embeddings stay)."""
        labels = [obj.label for obj in objects]
        image_key = PredictorCache.image_key(image.meta.get("filename_or_obj"))
        if image_key is None or len(set(labels)) != len(labels):  # nothing to find it again by
            return self._segment(self.predictor(network), image, objects, modality)
        settings = tuple(sorted((k, repr(v)) for k, v in self.settings.items()))
        key = (image_key, modality, id(network), settings)
        cache = self.predictor_cache
        with cache.lock:
            kept = cache.get(key, network)
            if kept is not None and not _same_grid(kept.predictor, image):
                cache.discard(key)
                kept = None
            reused = kept is not None
            if kept is None:
                kept = _Kept(self.predictor(network), network)
                kept.predictor.set_image(image, modality=modality)
            predictor = kept.predictor
            computed_before = predictor.embeddings_computed
            try:
                for obj in objects:
                    mask_signature = None
                    if obj.earlier is not None:
                        mask_signature = hashlib.sha1(obj.earlier.numpy().tobytes()).hexdigest()
                    before = kept.applied.get(obj.label)
                    new = _added(before[2], obj.clicks) if before and before[:2] == (mask_signature, obj.box) else None
                    if new is None:  # a first request, or clicks taken back: start the object again
                        predictor.reset(obj.label)
                        kept.applied.pop(obj.label, None)
                        _give(predictor, obj.label, obj)
                    else:
                        _give(predictor, obj.label, _ObjectPrompts(obj.label, None, None, new))
                    kept.applied[obj.label] = (mask_signature, obj.box, obj.clicks)
                report: dict[str, Any] = {"objects": [predictor.report(label) for label in labels]}
                report["embeddings_computed"] = predictor.embeddings_computed - computed_before
                report["predictor_reused"] = reused
                label_map = predictor.label_map([(label, label) for label in labels])[None]
            except Exception:
                cache.discard(key)  # half-applied clicks: do not answer the next request from this state
                raise
            cache.put(key, kept)
        return label_map, report

    @staticmethod
    def _segment(
        predictor: VolumetricPredictor, image: MetaTensor, objects: list[_ObjectPrompts], modality: str
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One volume's objects through the predictor: its ``(1, D, H, W)`` label map and report."""
        predictor.set_image(image, modality=modality)
        for index, obj in enumerate(objects):
            _give(predictor, index, obj)
        report: dict[str, Any] = {"objects": [predictor.report(index) for index in range(len(objects))]}
        report["embeddings_computed"] = predictor.embeddings_computed
        return predictor.label_map([(index, obj.label) for index, obj in enumerate(objects)])[None], report


def _same_grid(predictor: VolumetricPredictor, image: MetaTensor) -> bool:
    """Whether ``image`` lies on the stored grid the predictor was set up with (a check on the cache key)."""
    grid = predictor.grid
    return (
        grid is not None
        and tuple(image.shape[1:]) == grid.stored_shape
        and np.allclose(np.asarray(image.affine, np.float64), grid.stored_affine, atol=1e-4)
    )


def _added(
    before: Sequence[tuple[tuple[float, ...], bool]], now: Sequence[tuple[tuple[float, ...], bool]]
) -> list[tuple[tuple[float, ...], bool]] | None:
    """The clicks of ``now`` that ``before`` lacks (each click counted as often as it occurs, in ``now``'s
    order); None if ``before`` holds a click that ``now`` does not (a click taken back)."""
    remaining: dict[tuple[tuple[float, ...], bool], int] = {}
    for click in before:
        remaining[click] = remaining.get(click, 0) + 1
    added = []
    for click in now:
        if remaining.get(click, 0) > 0:
            remaining[click] -= 1
        else:
            added.append(click)
    return None if any(remaining.values()) else added


class AutocastInferer(Inferer):
    """Runs ``inferer`` with every network call under autocast (``"bfloat16"``, ``"float16"`` or None) and
    float32 logits out; MONAI engines' own ``amp`` is CUDA-only, and bf16 is several times faster on CPUs
    with AMX/AVX512-BF16.

    Args:
        inferer: the wrapped inferer (``SimpleInferer`` for training, ``SlidingWindowInferer`` for volumes).
        autocast_dtype: the autocast dtype name, or None for full precision.
    """

    def __init__(self, inferer: Inferer, autocast_dtype: str | None = None) -> None:
        super().__init__()
        self.inferer = inferer
        self.autocast_dtype = check_autocast_dtype(autocast_dtype)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        def run(x: torch.Tensor, *a, **k) -> torch.Tensor:
            with autocast(x.device, self.autocast_dtype):
                return network(x, *a, **k).float()

        return self.inferer(inputs, run, *args, **kwargs)
