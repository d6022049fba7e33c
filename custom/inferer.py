"""MONAI inferers: :class:`PromptedInferer` runs the volumetric predictor inside an engine (prompted
inference, click-simulating evaluation and validation), :class:`AutocastInferer` puts any inferer under
autocast."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import nn

from .object_prompts import PROMPTS_META, CasePrompts, ObjectPrompts
from .precision import autocast, check_autocast_dtype
from .predictor import VolumetricPredictor
from .transforms import PROMPT_FAILED, PROMPT_REPORT


@dataclass
class _Kept:
    """A predictor kept by :class:`PredictorCache`, and what each of its objects was given so far."""

    predictor: VolumetricPredictor
    network: nn.Module
    # object label -> (earlier-mask signature, box, clicks applied as ((i, j, k), positive))
    applied: dict[int, tuple[str | None, tuple | None, Sequence[tuple[tuple[float, ...], bool]]]] = field(
        default_factory=dict
    )


def _earlier_mask(prev_mask: torch.Tensor | None, b: int, label: int) -> torch.Tensor | None:
    """Volume ``b``'s region of ``label`` in an earlier ``(B, 1, D, H, W)`` label map (None: empty or none)."""
    if prev_mask is None or prev_mask.numel() == 0:
        return None
    earlier = torch.as_tensor(prev_mask[b, 0]) == label
    return earlier if earlier.any() else None


def _give(
    predictor: VolumetricPredictor,
    key: Any,
    clicks: Sequence[tuple[Sequence[float], bool]],
    earlier: torch.Tensor | None = None,
    box: tuple | None = None,
) -> None:
    """Give an object its earlier mask, box and clicks, in that order."""
    if earlier is not None:
        predictor.set_mask(key, earlier)
    if box is not None:
        predictor.add_box(key, box[0], box[1])
    for point, positive in clicks:
        predictor.add_click(key, point, positive)


def _per_volume(objects: Any, batch: int) -> list[Sequence[ObjectPrompts]]:
    """``objects`` (per volume a :class:`CasePrompts` or a sequence of :class:`ObjectPrompts`; one volume's alone
    for a batch of one) as one sequence of :class:`ObjectPrompts` per volume."""
    if isinstance(objects, CasePrompts) or (
        isinstance(objects, Sequence) and objects and isinstance(objects[0], ObjectPrompts)
    ):
        objects = [objects]
    objects = [case.objects if isinstance(case, CasePrompts) else case for case in objects or ()]
    if len(objects) != batch or not all(
        isinstance(case, Sequence) and all(isinstance(o, ObjectPrompts) for o in case) for case in objects
    ):
        raise ValueError(
            f"objects must give each of the {batch} volume(s) a sequence of custom.object_prompts.ObjectPrompts, "
            f"got {len(objects)} entries ({', '.join(sorted({type(o).__name__ for o in objects})) or 'none'})"
        )
    return objects


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
    """An inferer that segments the prompted objects of a batch of stored-grid volumes with a
    :class:`~custom.predictor.VolumetricPredictor`.

    Args:
        predictor: makes a predictor for a network, ``predictor(network)``: the predictor class itself, or its
            settings bound (``functools.partial``; a config's ``"_mode_": "callable"`` item, declared once and
            shared with the click-simulating steps).
        failures: an object with ``report_failure(message)`` (the run's case list): a volume that fails is
            reported there, flagged in its prediction's metadata (``prompt_failed``, so that nothing is saved
            for it) and the others go on; None: the error propagates.
        predictor_cache: keep one predictor per image across calls (:class:`PredictorCache`, for interactive
            servers: a further click on the same image is not re-encoded); None (the command line): a new
            predictor per call.
    """

    def __init__(
        self,
        predictor: Callable[[nn.Module], VolumetricPredictor] = VolumetricPredictor,
        failures: Any = None,
        predictor_cache: PredictorCache | None = None,
    ) -> None:
        super().__init__()
        if not callable(predictor):
            raise TypeError(f"predictor must make a VolumetricPredictor from a network, got {predictor!r}")
        self.predictor = predictor
        self.failures = failures
        self.predictor_cache = predictor_cache

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        objects: Sequence[Sequence[ObjectPrompts]] | None = None,
        *args: Any,
        prev_mask: torch.Tensor | None = None,
        modality: Sequence[str] | str | None = None,
        case: Sequence[str] | str | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Label maps on the stored grid for a batch of volumes.

        Args:
            inputs: ``(B, 1, D, H, W)`` images as stored (MetaTensor: the affine defines the grid).
            network: the promptable network.
            objects: per volume, its :class:`~custom.object_prompts.ObjectPrompts` (clicks and box in voxel
                indices of the stored grid, the label each gets), as
                :class:`~custom.transforms.ClicksToVoxelsd` makes them; None: those it left in the image's
                metadata (an inferer called as ``inferer(inputs, network)``, as MONAI Label does).
            prev_mask: ``(B, 1, D, H, W)`` an earlier label map to continue from (an empty tensor or None:
                none): each object continues from its own label's region.
            modality: per volume (chooses the intensity clamping).
            case: per volume, the name failures are reported under.

        Returns:
            ``(B, 1, D, H, W)`` int16 label maps (where objects overlap, the higher logit wins), a MetaTensor with the
            input's metadata and, under ``prompt_report``, one JSON report per volume (``prompt_failed``: which
            volumes failed).
        """
        if not isinstance(inputs, MetaTensor):
            raise TypeError("PromptedInferer needs the images as MetaTensors (their affines define the grids)")
        batch = inputs.shape[0]
        if objects is None:
            objects = inputs.meta.get(PROMPTS_META)
            if objects is None:
                raise ValueError(
                    "no prompts: pass objects (custom.object_prompts.ObjectPrompts per volume), or prepare the "
                    "image with custom.transforms.ClicksToVoxelsd, which leaves them in its metadata"
                )
            if isinstance(objects, CasePrompts):  # one volume's, batched by MONAI Label without collation
                objects = [objects] * batch
        objects = _per_volume(objects, batch)
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
                earlier = [_earlier_mask(prev_mask, b, obj.label) for obj in objects[b]]
                modality_b = str(per_volume[0][b] or "")
                if predictor is not None:
                    label_map, report = self._segment(predictor, image, objects[b], earlier, modality_b)
                else:
                    label_map, report = self._segment_kept(network, image, objects[b], earlier, modality_b)
            except Exception as err:  # one bad case must not stop the others
                if self.failures is None:
                    raise
                self.failures.report_failure(f"case {per_volume[1][b] or name!r}: {type(err).__name__}: {err}")
                label_map, report = torch.zeros((1, *inputs.shape[2:]), dtype=torch.int16), {"failed": str(err)}
            failed.append("failed" in report)
            outputs.append(label_map)
            reports.append(json.dumps(report))
        result = MetaTensor(torch.stack(outputs), meta={k: v for k, v in inputs.meta.items() if k != PROMPTS_META})
        result.is_batch = inputs.is_batch
        result.meta[PROMPT_REPORT] = reports
        result.meta[PROMPT_FAILED] = failed
        return result

    def _segment_kept(
        self,
        network: nn.Module,
        image: MetaTensor,
        objects: Sequence[ObjectPrompts],
        earlier: Sequence[torch.Tensor | None],
        modality: str,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """:meth:`_segment` with the image's predictor from :attr:`predictor_cache`: an object whose clicks
        include all those it was given before (and the same earlier mask and box) gets only the new ones; any
        other object is reset and given all its clicks again (the embeddings stay)."""
        labels = [obj.label for obj in objects]
        image_key = PredictorCache.image_key(image.meta.get("filename_or_obj"))
        if image_key is None or len(set(labels)) != len(labels):  # nothing to find it again by
            return self._segment(self.predictor(network), image, objects, earlier, modality)
        key = (image_key, modality, id(network), repr(self.predictor))  # a partial's repr lists its settings
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
                for obj, mask in zip(objects, earlier):
                    mask_signature = None if mask is None else hashlib.sha1(mask.numpy().tobytes()).hexdigest()
                    before = kept.applied.get(obj.label)
                    new = _added(before[2], obj.clicks) if before and before[:2] == (mask_signature, obj.box) else None
                    if new is None:  # a first request, or clicks taken back: start the object again
                        predictor.reset(obj.label)
                        kept.applied.pop(obj.label, None)
                        _give(predictor, obj.label, obj.clicks, mask, obj.box)
                    else:
                        _give(predictor, obj.label, new)
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
        predictor: VolumetricPredictor,
        image: MetaTensor,
        objects: Sequence[ObjectPrompts],
        earlier: Sequence[torch.Tensor | None],
        modality: str,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One volume's objects through the predictor: its ``(1, D, H, W)`` label map and report."""
        predictor.set_image(image, modality=modality)
        for index, (obj, mask) in enumerate(zip(objects, earlier)):
            _give(predictor, index, obj.clicks, mask, obj.box)
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
