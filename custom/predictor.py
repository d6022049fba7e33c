"""The volumetric predictor: set an image once, add clicks to objects, read each object's mask on the stored grid.

As ``SamPredictor`` does for 2D SAM, the image is prepared once (:class:`~custom.preprocessing.NetworkInput`, as
training prepares it: oriented to RAS, clamped by modality, resampled to the network's spacing) and every prompt
afterwards costs only what it changes:

- a click runs one prompt step (one ``decode``) in each window of its object that holds it, starting from that
  window's saved low-res logits (a click outside every window opens one centred on it);
- where the prediction reaches a window face inside the image, a window shifted by ``stride`` is added with a
  positive click at the deepest predicted voxel inside it, until the object is closed or ``max_windows`` are
  used; windows are blended with a Gaussian importance map;
- window embeddings are kept in a cache of bounded size, shared by the objects;
- the object's mask on the stored grid is updated only over the boxes of the windows that changed.

Coordinates: clicks are voxel indices of the stored grid (array order, as on disk) or world coordinates (the
image affine's space, RAS mm for MONAI-loaded images); windows and logits live on the network grid.

The network needs ``encode(crop) -> embedding``, ``decode(embedding, coords, labels, mask_input) ->
(low-res logits, iou)`` and ``img_size``; see :class:`custom.networks.SamMed3D`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing, compute_importance_map

from .io import load_volume
from .networks.prompt_encoder import BOX_MAX, BOX_MIN
from .networks.sam_med3d import mask_prompt_logits, upsample_logits
from .object_prompts import check_inside_image, world_to_voxel
from .precision import autocast, check_autocast_dtype
from .preprocessing import NetworkInput
from .prompts import CLICK_MEMORIES, check_click_memory, deepest_point, mask_box, prompt_points
from .spacing import NetworkGrid
from .window import extract_window, normalize_crop

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass
class _Window:
    start: tuple[int, int, int]
    # one group per prompt step (a click, or a box's two corners): window-local coords and labels
    prompts: list[list[tuple[torch.Tensor, int]]] = field(default_factory=list)
    low_res: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (S, S, S) float32


@dataclass
class _Object:
    mask: torch.Tensor  # stored grid, bool
    windows: dict[tuple[int, int, int], _Window] = field(default_factory=dict)
    prior: torch.Tensor | None = None  # an earlier mask on the network grid (bool)
    prior_box: list[tuple[int, int]] | None = None  # its bounding box on the stored grid
    clicks: int = 0
    boxes: int = 0
    box_as_click: bool = False
    prompt_steps: int = 0
    ignored_clicks: int = 0
    encoded: int = 0
    seconds: float = 0.0


class VolumetricPredictor:
    """Interactive segmentation of one volume at a time (see the module docstring).

    Args:
        network: the promptable network (in eval mode while predicting).
        spacing_mm: the network grid's voxel size, one per axis or one for all.
        roi_size: window side (voxels); None takes the network's ``img_size``.
        stride: shift of a growth window (voxels); default half the window.
        max_windows: windows per object at most.
        click_memory: ``"all"`` (every click of the window so far and the previous logits, as upstream's inference
            and our training do) or ``"newest"`` (the newest click and the previous logits, as upstream trains).
        reuse_margin: how far inside a cached window an object's first click must be for its embedding to be
            reused instead of a window centred on the click.
        autocast_dtype: ``"bfloat16"``, ``"float16"`` or None.
        sigma_scale: of the Gaussian blending map, relative to the window.
        intensity_normalization: applied to each window before encoding (default :func:`normalize_crop`, as
            upstream); None passes the resampled intensities.
        intensity_clamp_by_modality: modality -> (low, high), applied before resampling (``{"CT": (-1000, 1000)}``,
            as in training).
        prev_mask_logit: magnitude of the logits that an earlier mask (:meth:`set_mask`) stands for as a prompt.
        max_cached_embeddings: window embeddings kept at most (least recently used dropped first).
        max_grid_voxels: the largest network grid :meth:`set_image` allocates; a larger one is refused with the
            grid, the spacing and the memory it would need.
        device: where the network runs (default: where its parameters are).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        spacing_mm: Sequence[float] | float = 1.5,
        roi_size: int | None = None,
        stride: int | None = None,
        max_windows: int = 8,
        click_memory: str = "all",
        reuse_margin: int = 16,
        autocast_dtype: str | None = None,
        sigma_scale: float = 0.125,
        intensity_normalization: Callable[[torch.Tensor], torch.Tensor] | None = normalize_crop,
        intensity_clamp_by_modality: Mapping[str, Sequence[float]] | None = None,
        prev_mask_logit: float = 4.0,
        max_cached_embeddings: int = 32,
        max_grid_voxels: int = 2**28,
        device: torch.device | str | None = None,
    ) -> None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        if max_cached_embeddings < 1:
            raise ValueError(f"max_cached_embeddings must be >= 1, got {max_cached_embeddings}")
        self.network = network
        # the image's preparation and each window's normalisation, as the training transforms do them
        self.network_input = NetworkInput(spacing_mm, intensity_clamp_by_modality, intensity_normalization)
        self.size = int(roi_size or network.img_size)
        self.stride = int(stride or self.size // 2)
        self.max_windows = max_windows
        self.click_memory = check_click_memory(click_memory)
        self.reuse_margin = reuse_margin
        self.autocast_dtype = check_autocast_dtype(autocast_dtype)
        self.prev_mask_logit = prev_mask_logit
        self.max_cached_embeddings = max_cached_embeddings
        self.max_grid_voxels = int(max_grid_voxels)
        self.device = torch.device(device) if device is not None else next(network.parameters(), torch.zeros(0)).device
        self.importance = compute_importance_map((self.size,) * 3, mode="gaussian", sigma_scale=sigma_scale)
        self.image: torch.Tensor | None = None
        self.grid: NetworkGrid | None = None
        self.embeddings: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()
        self.objects: dict[Any, _Object] = {}
        self.embeddings_computed = 0

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """The network grid's voxel size (mm), per array axis."""
        return self.network_input.spacing_mm

    # ----------------------------------------------------------------------------------------------- image

    def set_image(self, image: str | MetaTensor, modality: str = "") -> NetworkGrid:
        """Prepare a volume: a path (NIfTI, NRRD/MHA, DICOM folder) or a channel-first ``(1, D, H, W)``
        MetaTensor with its affine. Forgets every object and cached embedding of the previous image.

        Returns:
            the :class:`~custom.spacing.NetworkGrid` between the stored grid and the network's.

        Raises:
            ValueError: not a single-channel 3D volume, or a network grid above ``max_grid_voxels``.
        """
        if isinstance(image, str):  # the header checked first (load_volume): a gzip bomb is refused unread
            image = load_volume(image, max_grid_voxels=self.max_grid_voxels, spacing_mm=self.spacing_mm)
        if not isinstance(image, MetaTensor) or image.ndim != 4 or image.shape[0] != 1:
            shape = tuple(getattr(image, "shape", ()))
            raise ValueError(f"set_image expects a single-channel 3D MetaTensor (1, D, H, W), got shape {shape}")
        stored = image
        prepare = self.network_input.stored_grid(in_place=False)  # the caller's tensor stays as it was
        oriented = prepare({"image": image, "modality": str(modality)})["image"]
        resample = self.network_input.resampling("image", "bilinear")
        network_affine, network_shape = resample.target_grid(oriented)
        voxels = int(np.prod(network_shape))
        if voxels > self.max_grid_voxels:
            source = stored.meta.get("filename_or_obj", "the image")
            raise ValueError(
                f"{source}: resampling its {tuple(stored.shape[1:])} voxels of "
                f"{np.round(affine_to_spacing(stored.affine.numpy()), 3).tolist()} mm to "
                f"{list(self.spacing_mm)} mm makes a {tuple(network_shape)} grid ({voxels:,} voxels, "
                f"{voxels * 4 / 2**30:.1f} GiB as float32), above max_grid_voxels={self.max_grid_voxels:,}; "
                "check the header's voxel size, or raise the limit"
            )
        resampled = resample({"image": oriented})["image"]
        self.image = resampled.as_tensor()[0].float()
        self.grid = NetworkGrid(stored.affine, stored.shape[1:], resampled.affine, resampled.shape[1:])
        self.embeddings.clear()
        self.objects.clear()
        self.embeddings_computed = 0
        return self.grid

    def _require_image(self) -> NetworkGrid:
        if self.grid is None:
            raise RuntimeError("no image: call set_image first")
        return self.grid

    # --------------------------------------------------------------------------------------------- objects

    def _object(self, key: Any) -> _Object:
        grid = self._require_image()
        if key not in self.objects:
            self.objects[key] = _Object(mask=torch.zeros(grid.stored_shape, dtype=torch.bool))
        return self.objects[key]

    def reset(self, key: Any = None) -> None:
        """Forget one object's clicks and mask (``key``), or every object's (None); embeddings stay."""
        if key is None:
            self.objects.clear()
        else:
            self.objects.pop(key, None)

    def mask(self, key: Any) -> torch.Tensor:
        """The object's current mask on the stored grid, ``(D, H, W)`` bool (empty before any click)."""
        return self._object(key).mask

    def label_map(self, keys_and_labels: Sequence[tuple[Any, int]]) -> torch.Tensor:
        """The objects' masks as one ``(D, H, W)`` int16 label map. Where masks overlap, the object with the
        higher blended logit there wins (a voxel of a mask that no window reaches, from :meth:`set_mask`, counts
        as logit 0); on a tie, the later object."""
        grid = self._require_image()
        out = torch.zeros(grid.stored_shape, dtype=torch.int16)
        claims = torch.zeros(grid.stored_shape, dtype=torch.uint8)
        for key, label in keys_and_labels:
            out[self.mask(key)] = int(label)
            claims += self.mask(key)
        contested = claims > 1
        if not contested.any():
            return out
        # only the box of the contested voxels needs the objects' logits on the stored grid
        contested_box = mask_box(contested)
        origin = [lo for lo, _ in contested_box]
        crop = tuple(slice(lo, hi) for lo, hi in contested_box)
        best = torch.full([hi - lo for lo, hi in contested_box], -torch.inf)
        winner = out[crop].clone()
        for key, label in keys_and_labels:
            obj = self._object(key)
            inside = obj.mask[crop] & contested[crop]
            if not inside.any():
                continue
            score = torch.zeros_like(best)
            for start in obj.windows:
                box = self._window_box(start)
                blended = self._blend(obj, box)
                if blended is not None:
                    grid.paste(blended[0], box, score, origin)
            wins = inside & (score >= best)
            best[wins], winner[wins] = score[wins], int(label)
        out[crop] = torch.where(contested[crop], winner, out[crop])
        return out

    def set_mask(self, key: Any, mask: torch.Tensor) -> None:
        """Continue from an earlier mask of an object, ``(D, H, W)`` on the stored grid: it is the object's mask
        where no window reaches, the first mask prompt of every window, and the source of a positive click for a
        window that holds none."""
        grid = self._require_image()
        mask = (mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)).bool()
        if tuple(mask.shape) != grid.stored_shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the image's {grid.stored_shape}")
        obj = self._object(key)
        obj.mask = mask.clone()
        obj.prior_box = mask_box(mask)
        meta = MetaTensor(mask[None].to(torch.uint8), affine=torch.as_tensor(grid.stored_affine))
        oriented = self.network_input.stored_grid(image_key=None, label_keys="mask")({"mask": meta})
        resampled = self.network_input.resampling("mask", "nearest")(oriented)["mask"]
        obj.prior = resampled.as_tensor()[0] > 0

    def extent(self, key: Any) -> tuple[slice, slice, slice] | None:
        """A box of the stored grid outside which the object's mask is empty (its windows' boxes and its earlier
        mask's); None while it has neither."""
        obj = self._object(key)
        boxes = [self.grid.stored_box(self._window_box(start)) for start in obj.windows]
        boxes = [box for box in boxes if box is not None] + ([obj.prior_box] if obj.prior_box else [])
        if not boxes:
            return None
        return tuple(slice(min(b[a][0] for b in boxes), max(b[a][1] for b in boxes)) for a in range(3))

    def report(self, key: Any) -> dict[str, Any]:
        """What the predictor did for an object: windows (starts on the network grid), embeddings computed,
        clicks, prompt steps and seconds spent."""
        obj = self._object(key)
        return {
            "windows": [list(start) for start in obj.windows],
            "windows_encoded": obj.encoded,
            "clicks": obj.clicks,
            "boxes": obj.boxes,
            **(
                {"box_given_as": "a positive click at its centre (the network has no box embeddings)"}
                if obj.box_as_click
                else {}
            ),
            "prompt_steps": obj.prompt_steps,
            "ignored_clicks": obj.ignored_clicks,
            "seconds": round(obj.seconds, 4),
        }

    # ---------------------------------------------------------------------------------------------- clicks

    def add_click(self, key: Any, point: Sequence[float], positive: bool, space: str = "voxel") -> torch.Tensor:
        """One click on an object: voxel indices of the stored grid (``space="voxel"``) or world coordinates
        (``"world"``). Returns the object's updated mask on the stored grid (see :meth:`mask`).

        Raises:
            ValueError: the point lies outside the image.
        """
        started = time.perf_counter()
        grid = self._require_image()
        stored = self._stored_voxels([point], space)
        check_inside_image(stored, [point], space, grid.stored_shape)
        obj = self._object(key)
        obj.clicks += 1
        point = grid.stored_to_network(stored)[0]
        changed = self._apply_prompt(obj, point, [(point, int(bool(positive)))])
        self._paste(obj, changed)
        obj.seconds += time.perf_counter() - started
        return obj.mask

    def _stored_voxels(self, points: Sequence[Sequence[float]], space: str) -> np.ndarray:
        """``(N, 3)`` voxel indices of the stored grid from points given in ``space`` (``"voxel"`` or ``"world"``)."""
        if space not in ("voxel", "world"):
            raise ValueError(f"space must be 'voxel' or 'world', got {space!r}")
        voxels = np.asarray(points, np.float64).reshape(-1, 3)
        return world_to_voxel(voxels, self._require_image().stored_affine) if space == "world" else voxels

    @property
    def supports_boxes(self) -> bool:
        """Whether the network embeds boxes (:class:`~custom.networks.prompt_encoder.PromptEncoder3D`'s
        ``box_prompts``); without, a box becomes a positive click at its centre."""
        return bool(getattr(getattr(self.network, "prompt_encoder", None), "box_prompts", False))

    def add_box(
        self, key: Any, box_min: Sequence[float], box_max: Sequence[float], space: str = "voxel"
    ) -> torch.Tensor:
        """A box on an object, its minimum and maximum corners (closed; voxel indices of the stored grid, or
        world coordinates with ``space="world"``). A network without box embeddings (the released weights) gets
        a positive click at the box's centre instead, and the report says so. Returns the updated mask.

        Raises:
            ValueError: a corner outside the image, or ``box_min > box_max``.
        """
        started = time.perf_counter()
        grid = self._require_image()
        corners = self._stored_voxels([box_min, box_max], space)
        low, high = corners.min(0), corners.max(0)
        if space == "voxel" and np.any(corners[0] > corners[1]):
            raise ValueError(f"box min {list(box_min)} is not <= max {list(box_max)} on every axis")
        check_inside_image(corners, [box_min, box_max], space, grid.stored_shape, "box corner")
        obj = self._object(key)
        obj.boxes += 1
        centre = grid.stored_to_network((low + high) / 2)[0]
        if self.supports_boxes:
            # the network grid may flip axes: the 8 corners' extent there
            cube = np.array(
                [[a, b, c] for a in (low[0], high[0]) for b in (low[1], high[1]) for c in (low[2], high[2])]
            )
            mapped = grid.stored_to_network(cube)
            group = [(mapped.min(0).values, BOX_MIN), (mapped.max(0).values, BOX_MAX)]
        else:
            obj.box_as_click = True
            group = [(centre, 1)]
        changed = self._apply_prompt(obj, centre, group)
        self._paste(obj, changed)
        obj.seconds += time.perf_counter() - started
        return obj.mask

    def _inside(self, point: torch.Tensor, start: Sequence[int], margin: int = 0) -> bool:
        return all(s + margin <= float(p) < s + self.size - margin for p, s in zip(point, start))

    def _centred(self, point: torch.Tensor) -> tuple[int, int, int]:
        return tuple(int(round(float(p))) - self.size // 2 for p in point)

    def _apply_prompt(
        self, obj: _Object, point: torch.Tensor, group: list[tuple[torch.Tensor, int]]
    ) -> list[tuple[int, int, int]]:
        """The prompt steps of one click or box (``group``, network-grid coordinates; ``point``: where it is,
        the click or the box's centre), then growth; returns the changed windows."""
        label = 0 if all(lab == 0 for _, lab in group) else 1
        affected = [start for start in obj.windows if self._inside(point, start)]
        if not affected and len(obj.windows) >= self.max_windows:
            obj.ignored_clicks += 1  # outside the object's windows, and no window left to open
            return []
        if not affected:
            if not obj.windows:  # an object's first window may reuse a cached embedding
                start = next((s for s in self.embeddings if self._inside(point, s, self.reuse_margin)), None)
                start = start or self._centred(point)
            else:
                start = self._centred(point)
            window = _Window(start)
            if label == 0:  # a negative click in a new window: only an earlier mask gives it something to correct
                pseudo = self._pseudo_click(obj, start)
                if pseudo is None:
                    obj.ignored_clicks += 1
                    return []
                window.prompts.append([(pseudo, 1)])
            obj.windows[start] = window
            affected = [start]
        for start in affected:
            window = obj.windows[start]
            offset = torch.tensor(start, dtype=torch.float32)
            window.prompts.append([(self._clipped(p - offset), lab) for p, lab in group])
            self._prompt_step(obj, window)
        return affected + self._grow(obj, affected)

    def _clipped(self, local: torch.Tensor) -> torch.Tensor:
        """A window-local point kept inside the window (a box corner may lie beyond it)."""
        return local.clamp(0, self.size - 1)

    def _pseudo_click(self, obj: _Object, start: Sequence[int]) -> torch.Tensor | None:
        """The deepest voxel of the object's current prediction (or earlier mask) inside a window, window-local."""
        region = self._blend(obj, self._window_box(start)) if obj.windows else None
        if region is not None:
            logits, weights = region
            pseudo = deepest_point(_pad_to_window(logits > 0, self._window_box(start), start, self.size))
            if pseudo is not None:
                return pseudo
        if obj.prior is not None:
            return deepest_point(extract_window(obj.prior[None], start, self.size)[0])
        return None

    def _grow(self, obj: _Object, changed: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """Windows next to each face of a changed window that its prediction touches inside the image."""
        queue, added = list(changed), []
        while queue and len(obj.windows) < self.max_windows:
            start = queue.pop(0)
            for neighbour in self._growth_targets(obj.windows[start].logits, start):
                if neighbour in obj.windows or len(obj.windows) >= self.max_windows:
                    continue
                pseudo = self._pseudo_click(obj, neighbour)
                if pseudo is None:
                    continue
                window = _Window(neighbour, prompts=[[(pseudo, 1)]])
                obj.windows[neighbour] = window
                self._prompt_step(obj, window)
                queue.append(neighbour)
                added.append(neighbour)
        return added

    def _growth_targets(self, logits: torch.Tensor, start: Sequence[int]) -> list[tuple[int, int, int]]:
        spatial = self.image.shape
        inside = [slice(max(-s, 0), min(extent - s, self.size)) for s, extent in zip(start, spatial)]
        foreground = torch.zeros_like(logits, dtype=torch.bool)
        foreground[tuple(inside)] = logits[tuple(inside)] > 0
        targets = []
        for axis in range(3):
            for side, face in ((-1, inside[axis].start), (1, inside[axis].stop - 1)):
                at_border = (start[axis] + face <= 0) if side < 0 else (start[axis] + face >= spatial[axis] - 1)
                if at_border or not foreground.select(axis, face).any():
                    continue
                shifted = list(start)
                shifted[axis] += side * self.stride
                targets.append(tuple(shifted))
        return targets

    def _embedding(self, obj: _Object, start: tuple[int, int, int]) -> torch.Tensor:
        if start in self.embeddings:
            self.embeddings.move_to_end(start)
            return self.embeddings[start]
        crop = extract_window(self.image[None], start, self.size)
        crop = self.network_input.normalize_window(crop)
        with torch.no_grad(), autocast(self.device, self.autocast_dtype):
            embedding = self.network.encode(crop[None].to(self.device))
        self.embeddings[start] = embedding
        while len(self.embeddings) > self.max_cached_embeddings:
            self.embeddings.popitem(last=False)
        obj.encoded += 1
        self.embeddings_computed += 1
        return embedding

    def _prompt_step(self, obj: _Object, window: _Window) -> None:
        embedding = self._embedding(obj, window.start)
        mask_input = window.low_res
        if mask_input is None and obj.prior is not None:
            prior = extract_window(obj.prior[None], window.start, self.size)
            if prior.any():
                grid = embedding.shape[2:]
                mask_input = mask_prompt_logits(self.network, prior[None], grid, self.prev_mask_logit).to(self.device)
        coords, labels = prompt_points(window.prompts, self.click_memory)
        with torch.no_grad(), autocast(self.device, self.autocast_dtype):
            low_res, _ = self.network.decode(
                embedding, coords[None].to(self.device), labels[None].to(self.device), mask_input
            )
        obj.prompt_steps += 1
        if not torch.isfinite(low_res).all():
            raise ValueError(
                f"the network returned NaN or infinite logits in the window at {list(window.start)} (network grid): "
                "are its weights finite, and is the image?"
            )
        window.low_res = low_res
        window.logits = upsample_logits(low_res.float(), (self.size,) * 3)[0, 0].cpu()

    # ---------------------------------------------------------------------------------- blending, paste-back

    def _window_box(self, start: Sequence[int]) -> Box:
        """The part of a window inside the network grid, ``[lo, hi)`` per axis."""
        return tuple((max(s, 0), min(s + self.size, n)) for s, n in zip(start, self.image.shape))  # type: ignore

    def _blend(self, obj: _Object, box: Box) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Blended logits and summed weights of the object's windows over ``box``; None if the box is empty."""
        if any(hi <= lo for lo, hi in box):
            return None
        logit_sum = torch.zeros([hi - lo for lo, hi in box])
        weight_sum = torch.zeros_like(logit_sum)
        for start, window in obj.windows.items():
            if window.logits is None:
                continue
            dst, src = [], []
            for (lo, hi), s in zip(box, start):
                a, b = max(lo, s), min(hi, s + self.size)
                if b <= a:
                    break
                dst.append(slice(a - lo, b - lo))
                src.append(slice(a - s, b - s))
            else:
                weights = self.importance[tuple(src)]
                logit_sum[tuple(dst)] += weights * window.logits[tuple(src)]
                weight_sum[tuple(dst)] += weights
        return logit_sum / weight_sum.clamp_min(1e-12), weight_sum  # 0 where no window reaches

    def _paste(self, obj: _Object, changed: Sequence[tuple[int, int, int]]) -> None:
        """Update the stored-grid mask over the boxes of the changed windows."""
        for start in dict.fromkeys(changed):
            box = self._window_box(start)
            blended = self._blend(obj, box)
            if blended is not None:
                self.grid.paste(blended[0] > 0, box, obj.mask)


def _pad_to_window(region: torch.Tensor, box: Box, start: Sequence[int], size: int) -> torch.Tensor:
    """A region over ``box`` placed in a ``size^3`` window starting at ``start`` (zeros elsewhere)."""
    out = torch.zeros((size,) * 3, dtype=region.dtype)
    out[tuple(slice(lo - s, hi - s) for (lo, hi), s in zip(box, start))] = region
    return out


__all__ = ["CLICK_MEMORIES", "VolumetricPredictor"]
