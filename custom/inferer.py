"""MONAI inferers: :class:`PromptedInferer` runs the volumetric predictor inside an engine (prompted
inference, click-simulating evaluation and validation), :class:`AutocastInferer` puts any inferer under
autocast."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import nn

from .precision import autocast, check_autocast_dtype
from .predictor import VolumetricPredictor
from .prompts import check_click_memory
from .transforms import PROMPT_FAILED, PROMPT_REPORT, PROMPTS_META, normalize_crop


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
    ) -> None:
        super().__init__()
        self.failures = failures
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
        predictor = self.predictor(network)
        outputs, reports, failed = [], [], []
        network.eval()
        for b in range(batch):
            name = names[b] if isinstance(names, (list, tuple)) else names
            image = MetaTensor(inputs[b].as_tensor(), affine=affines[b], meta={"filename_or_obj": name or "<image>"})
            try:
                label_map, report = self._segment(
                    predictor,
                    image,
                    b,
                    point_coords,
                    point_labels,
                    object_labels,
                    prev_mask,
                    str(per_volume[0][b] or ""),
                    boxes,
                )
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

    @staticmethod
    def _segment(
        predictor: VolumetricPredictor,
        image: MetaTensor,
        b: int,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        object_labels: torch.Tensor,
        prev_mask: torch.Tensor | None,
        modality: str,
        boxes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One volume's objects through the predictor: its ``(1, D, H, W)`` label map and report."""
        predictor.set_image(image, modality=modality)
        order = []
        for index, label in enumerate(object_labels[b].tolist()):
            if prev_mask is not None and prev_mask.numel() > 0:
                earlier = torch.as_tensor(prev_mask[b, 0]) == label
                if earlier.any():
                    predictor.set_mask(index, earlier)
            if boxes is not None and boxes.numel() > 0 and not torch.isnan(boxes[b, index]).any():
                predictor.add_box(index, boxes[b, index, 0].tolist(), boxes[b, index, 1].tolist())
            valid = point_labels[b, index] >= 0
            for point, positive in zip(point_coords[b, index][valid].tolist(), point_labels[b, index][valid]):
                predictor.add_click(index, point, bool(positive))
            order.append((index, int(label)))
        report: dict[str, Any] = {"objects": [predictor.report(index) for index, _ in order]}
        report["embeddings_computed"] = predictor.embeddings_computed
        return predictor.label_map(order)[None], report


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
