"""Prompted inference over a whole (resampled) volume: encode once per window, apply the clicks in order,
grow overlapping windows while the object reaches a window's border, and blend them without seams.

The network needs ``encode(crop) -> embedding``, ``decode(embedding, coords, labels, mask_input) ->
(logits, iou)`` and ``img_size`` (the side of its cubic crop); see :class:`custom.networks.SamMed3D`.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map
from monai.inferers import Inferer
from torch import nn

from .networks.sam_med3d import LOW_RES_UPSCALE, upsample_logits
from .precision import autocast, check_autocast_dtype
from .prompts import deepest_point
from .transforms import PROMPT_REPORT, extract_window, normalize_crop

#: logit written where no window reached (sigmoid of it is 0 in float32).
BACKGROUND_LOGIT = -100.0


def _inside(point: torch.Tensor, start: Sequence[int], size: int, margin: int = 0) -> bool:
    return all(s + margin <= float(p) < s + size - margin for p, s in zip(point, start))


class PromptedWindowInferer(Inferer):
    """Segments each prompted object of a volume with one or more ``roi_size^3`` windows.

    For each object: the first window is centred on its first positive click (or is an existing window of
    this call that holds that click at least ``reuse_margin`` voxels inside, whose embedding is then reused);
    a click outside every window so far opens a window centred on it. In each window the object's clicks
    are applied in order, each step with the previous low-res logits as mask prompt (``click_memory="all"``
    passes every click so far, ``"newest"`` only the newest). Where the prediction reaches a window face that
    is not the image border, a window shifted by ``stride`` along that axis is added, with a positive click
    at the deepest predicted voxel inside it, until the object is closed or ``max_windows`` are used.
    Windows are blended with a Gaussian importance map.

    Args:
        roi_size: window side (voxels); None takes the network's ``img_size``.
        stride: shift of a growth window (voxels); default half the window.
        max_windows: windows per object at most.
        click_memory: ``"all"`` or ``"newest"``.
        reuse_margin: how far inside an existing window a new object's first click must be to reuse it.
        autocast_dtype: ``"bfloat16"``, ``"float16"`` or None (full precision).
        sigma_scale: of the Gaussian blending map, relative to the window.
        intensity_normalization: applied to each window before encoding (default :func:`normalize_crop`,
            as upstream); None passes the raw intensities.
        prev_mask_logit: magnitude of the logits that an earlier mask (``prev_mask``) stands for as a prompt.
    """

    def __init__(
        self,
        roi_size: int | None = None,
        stride: int | None = None,
        max_windows: int = 8,
        click_memory: str = "all",
        reuse_margin: int = 16,
        autocast_dtype: str | None = None,
        sigma_scale: float = 0.125,
        intensity_normalization: Callable[[torch.Tensor], torch.Tensor] | None = normalize_crop,
        prev_mask_logit: float = 4.0,
    ) -> None:
        super().__init__()
        if click_memory not in ("all", "newest"):
            raise ValueError(f"click_memory must be 'all' or 'newest', got {click_memory!r}")
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        self.roi_size = roi_size
        self.stride = stride
        self.max_windows = max_windows
        self.click_memory = click_memory
        self.reuse_margin = reuse_margin
        self.autocast_dtype = check_autocast_dtype(autocast_dtype)
        self.sigma_scale = sigma_scale
        self.intensity_normalization = intensity_normalization
        self.prev_mask_logit = prev_mask_logit

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        *args,
        object_labels: torch.Tensor | None = None,
        prev_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Per-object logits for a batch of volumes.

        Args:
            inputs: ``(B, 1, D, H, W)`` image (resampled, not normalised: each window is normalised itself).
            network: see the module docstring.
            point_coords: ``(B, n_objects, n_max, 3)`` voxel indices of ``inputs``, array order.
            point_labels: ``(B, n_objects, n_max)``: 1 positive, 0 negative, -1 padding.
            object_labels: ``(B, n_objects)`` label of each object in ``prev_mask``.
            prev_mask: ``(B, 1, D, H, W)`` an earlier label map to continue from (an empty tensor or None:
                none). Each object's earlier region is its first mask prompt in every window, the source of a
                positive click for a window without one, and is kept where no window of this call reaches.

        Returns:
            ``(B, n_objects, D, H, W)`` logits (``BACKGROUND_LOGIT`` where no window reached); a MetaTensor
            carrying the input's metadata and, under ``prompt_report``, one JSON report per volume.
        """
        outputs, reports = [], []
        for b in range(inputs.shape[0]):
            previous = None
            if prev_mask is not None and prev_mask.numel() > 0:
                if object_labels is None:
                    raise ValueError("prev_mask needs object_labels to find each object's earlier region")
                previous = torch.stack([prev_mask[b, 0] == label for label in object_labels[b].tolist()])
            logits, report = self.segment_volume(inputs[b], network, point_coords[b], point_labels[b], previous)
            outputs.append(logits)
            reports.append(json.dumps(report))
        result = torch.stack(outputs)
        if isinstance(inputs, MetaTensor):
            result = MetaTensor(result, meta=dict(inputs.meta))
            result.is_batch = inputs.is_batch
            result.meta[PROMPT_REPORT] = reports
        return result

    def segment_volume(
        self,
        image: torch.Tensor,
        network: torch.nn.Module,
        coords: torch.Tensor,
        labels: torch.Tensor,
        previous: torch.Tensor | None = None,
        embeddings: dict[tuple[int, ...], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """One volume ``(1, D, H, W)``, its objects' clicks ``(n_objects, n_max, 3)`` / ``(n_objects, n_max)``
        and optionally their earlier masks ``(n_objects, D, H, W)`` -> logits ``(n_objects, D, H, W)`` and a
        report (windows and seconds per object).

        ``embeddings`` (window start -> embedding) may be passed to share encoded windows across calls on the
        same volume (as evaluation does from click to click); by default each call starts empty.
        """
        image = image.as_tensor() if isinstance(image, MetaTensor) else image
        size = int(self.roi_size or network.img_size)
        stride = int(self.stride or size // 2)
        importance = compute_importance_map(
            (size,) * 3, mode="gaussian", sigma_scale=self.sigma_scale, device=image.device
        )
        embeddings = {} if embeddings is None else embeddings
        out = image.new_full((coords.shape[0], *image.shape[1:]), BACKGROUND_LOGIT, dtype=torch.float32)
        if previous is not None:
            out[previous.to(out.device)] = -BACKGROUND_LOGIT
        report = {"objects": []}
        for index in range(coords.shape[0]):
            started = time.perf_counter()
            valid = labels[index] >= 0
            object_coords = coords[index][valid].float().cpu()
            object_labels = labels[index][valid].long().cpu()
            windows, encoded = self._segment_object(
                image,
                network,
                object_coords,
                object_labels,
                size,
                stride,
                importance,
                embeddings,
                out[index],
                None if previous is None else previous[index].to(image.device),
            )
            report["objects"].append(
                {
                    "windows": [list(w) for w in windows],
                    "windows_encoded": encoded,
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
        report["embeddings_computed"] = sum(o["windows_encoded"] for o in report["objects"])
        return out, report

    def _first_window(self, point: torch.Tensor, size: int, embeddings: dict) -> tuple[int, ...]:
        for start in embeddings:
            if _inside(point, start, size, self.reuse_margin):
                return start
        return tuple(int(round(float(p))) - size // 2 for p in point)

    def _segment_object(self, image, network, coords, labels, size, stride, importance, embeddings, out, previous):
        spatial = image.shape[1:]
        logit_sum = torch.zeros(spatial, dtype=torch.float32, device=image.device)
        weight_sum = torch.zeros_like(logit_sum)
        positives = torch.nonzero(labels == 1)
        first = coords[int(positives[0, 0])] if len(positives) else coords[0]  # no positive: continuing prev_mask
        queue = deque([self._first_window(first, size, embeddings)])
        for point in coords:
            if not any(_inside(point, start, size) for start in queue):
                queue.append(tuple(int(round(float(p))) - size // 2 for p in point))
        planned, done, encoded = set(queue), [], 0
        while queue and len(done) < self.max_windows:
            start = queue.popleft()
            inside = torch.tensor([_inside(p, start, size) for p in coords], dtype=torch.bool)
            local_coords = coords[inside] - torch.tensor(start, dtype=torch.float32)
            local_labels = labels[inside]
            prior = None if previous is None else extract_window(previous[None], start, size)[0]
            if not (local_labels == 1).any():
                region = extract_window((weight_sum > 0)[None] & (logit_sum > 0)[None], start, size)[0]
                pseudo = deepest_point(region)
                if pseudo is None and prior is not None:
                    pseudo = deepest_point(prior)
                if pseudo is None:
                    continue
                local_coords = torch.cat([pseudo[None], local_coords])
                local_labels = torch.cat([torch.ones(1, dtype=torch.long), local_labels])
            if start not in embeddings:
                crop = extract_window(image, start, size)
                if self.intensity_normalization is not None:
                    crop = self.intensity_normalization(crop)
                with torch.no_grad(), autocast(image.device, self.autocast_dtype):
                    embeddings[start] = network.encode(crop[None])
                encoded += 1
            window_logits = self._apply_clicks(network, embeddings[start], local_coords, local_labels, size, prior)
            done.append(start)
            self._accumulate(window_logits, start, importance, logit_sum, weight_sum)
            for neighbour in self._growth(window_logits, start, size, stride, spatial):
                if neighbour not in planned:
                    planned.add(neighbour)
                    queue.append(neighbour)
        covered = weight_sum > 0
        out[covered] = logit_sum[covered] / weight_sum[covered]
        return done, encoded

    def _apply_clicks(self, network, embedding, coords, labels, size, prior=None) -> torch.Tensor:
        device = embedding.device
        coords, labels = coords.to(device), labels.to(device)
        low_res = None
        if prior is not None and prior.any():
            # the earlier mask as logits of +-prev_mask_logit at the decoder's mask-prompt resolution
            low_res_size = [LOW_RES_UPSCALE * g for g in embedding.shape[2:]]
            fraction = torch.nn.functional.interpolate(prior[None, None].float(), size=low_res_size, mode="area")
            low_res = (2 * fraction - 1) * self.prev_mask_logit
        with torch.no_grad(), autocast(device, self.autocast_dtype):
            for step in range(len(coords)):
                first = 0 if self.click_memory == "all" else step
                low_res, _ = network.decode(
                    embedding, coords[None, first : step + 1], labels[None, first : step + 1], low_res
                )
        return upsample_logits(low_res.float(), (size,) * 3)[0, 0]

    @staticmethod
    def _accumulate(window_logits, start, importance, logit_sum, weight_sum) -> None:
        src, dst = [], []
        for s, extent in zip(start, logit_sum.shape):
            lo, hi = max(s, 0), min(s + window_logits.shape[0], extent)
            src.append(slice(lo - s, hi - s))
            dst.append(slice(lo, hi))
        weights = importance[tuple(src)]
        logit_sum[tuple(dst)] += weights * window_logits[tuple(src)]
        weight_sum[tuple(dst)] += weights

    @staticmethod
    def _growth(window_logits, start, size, stride, spatial) -> list[tuple[int, ...]]:
        """Windows next to each face that the prediction touches inside the image (not at its border)."""
        inside = [slice(max(-s, 0), min(extent - s, size)) for s, extent in zip(start, spatial)]
        foreground = torch.zeros_like(window_logits, dtype=torch.bool)
        foreground[tuple(inside)] = window_logits[tuple(inside)] > 0
        neighbours = []
        for axis in range(3):
            for side, face in ((-1, inside[axis].start), (1, inside[axis].stop - 1)):
                at_image_border = (start[axis] + face <= 0) if side < 0 else (start[axis] + face >= spatial[axis] - 1)
                if at_image_border or not foreground.select(axis, face).any():
                    continue
                shifted = list(start)
                shifted[axis] += side * stride
                neighbours.append(tuple(shifted))
        return neighbours


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
