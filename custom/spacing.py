"""Resampling to a target spacing that is fast on whole CT volumes and gives Spacingd's result.

MONAI's ``Spacingd`` resamples through ``affine_grid`` + ``grid_sample``: a coordinate triple per output voxel,
about 1.5 s per direction for a 512 x 512 x 100 CT on two cores, a large part of the interactive budget.
But ``Spacingd`` (with its default ``diagonal=False``) keeps the scan's axis directions and changes only the
voxel size, so the voxel mapping is a scale and shift per axis, oblique scans included: trilinear
interpolation is three 1D linear passes and nearest is one index lookup per axis. Same grid, affine and
values, in a fraction of the time and memory. Anything else (lazy execution, pending operations, other
interpolation modes) falls back to ``Spacingd`` itself.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import compute_shape_offset, zoom_affine
from monai.transforms import InvertibleTransform, MapTransform, Spacingd
from monai.utils import TraceKeys, ensure_tuple_rep

_FAST_MODES = ("bilinear", "nearest")
_AXIS_ALIGNED_TOL = 1e-6


def axis_mapping(src_affine: np.ndarray, dst_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-axis ``(scale, shift)`` with ``src_voxel = scale * dst_voxel + shift``, or None if the grids are not
    axis-aligned to each other (the voxel mapping mixes axes)."""
    xform = np.linalg.solve(np.asarray(src_affine, np.float64), np.asarray(dst_affine, np.float64))[:3]
    linear = xform[:, :3]
    if np.abs(linear - np.diag(np.diag(linear))).max() > _AXIS_ALIGNED_TOL * np.abs(linear).max():
        return None
    return np.diag(linear).copy(), xform[:, 3].copy()


def resample_axis_aligned(
    image: torch.Tensor,
    scale: Sequence[float],
    shift: Sequence[float],
    out_shape: Sequence[int],
    mode: str,
) -> torch.Tensor:
    """Resample ``(C, D, H, W)`` onto ``out_shape`` where output voxel ``o`` of axis ``a`` reads source voxel
    ``scale[a] * o + shift[a]``, clamped to the volume (``grid_sample``'s border padding).

    Args:
        mode: ``"bilinear"`` (trilinear, computed in float32) or ``"nearest"`` (keeps the dtype; ties round
            to even, as ``grid_sample``).
    """
    if mode not in _FAST_MODES:
        raise ValueError(f"mode must be one of {_FAST_MODES}, got {mode!r}")
    out = image.float() if mode == "bilinear" else image
    # Lookups along the outermost spatial dim are contiguous row copies (fast); along inner dims they are
    # strided gathers (tens of times slower). So each pass resamples dim 1, then rotates the next axis there.
    for s, t, n_out in zip(scale, shift, out_shape):
        n_in = out.shape[1]
        coords = (s * torch.arange(n_out, dtype=torch.float64) + t).clamp(0, n_in - 1)
        if mode == "nearest":
            out = out.index_select(1, coords.round().long().to(image.device))
        else:
            lower = coords.floor().clamp(max=max(n_in - 2, 0)).long()
            weight = (coords - lower).to(torch.float32).reshape(1, n_out, 1, 1).to(image.device)
            upper = (lower + 1).clamp(max=n_in - 1).to(image.device)
            lower = lower.to(image.device)
            out = torch.lerp(out.index_select(1, lower), out.index_select(1, upper), weight)
        out = out.permute(0, 2, 3, 1).contiguous()
    return out


class AxisAlignedSpacingd(MapTransform, InvertibleTransform):
    """``Spacingd`` (border padding, ``align_corners=False``, ``diagonal=False``) with a separable fast path.

    Args:
        keys: keys of channel-first ``MetaTensor`` volumes.
        pixdim: target spacing (mm) along the array axes.
        mode: ``"bilinear"`` or ``"nearest"``, one per key or one for all.
        allow_missing_keys: skip keys that are absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: Sequence[float] | float,
        mode: Sequence[str] | str = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pixdim = np.asarray(ensure_tuple_rep(pixdim, 3), np.float64)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.fallback = Spacingd(keys, pixdim, mode=mode, dtype=torch.float32, allow_missing_keys=allow_missing_keys)

    def _target_grid(self, image: MetaTensor) -> tuple[np.ndarray, list[int]]:
        src_affine = image.affine.numpy().astype(np.float64)
        dst_affine = zoom_affine(src_affine, self.pixdim, diagonal=False)
        shape, offset = compute_shape_offset(image.shape[1:], src_affine, dst_affine, scale_extent=False)
        dst_affine[:3, 3] = offset[:3]
        return dst_affine, [int(s) for s in shape]

    def _fast_path_applies(self, d: Mapping[Hashable, Any]) -> bool:
        for key, mode in self.key_iterator(d, self.mode):
            image = d[key]
            if not isinstance(image, MetaTensor) or image.ndim != 4 or mode not in _FAST_MODES:
                return False
            if image.pending_operations or axis_mapping(image.affine.numpy(), self._target_grid(image)[0]) is None:
                return False
        return True

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self._fast_path_applies(d):
            return self.fallback(d)
        for key, mode in self.key_iterator(d, self.mode):
            image: MetaTensor = d[key]
            src_affine = image.affine.numpy().astype(np.float64)
            dst_affine, shape = self._target_grid(image)
            scale, shift = axis_mapping(src_affine, dst_affine)
            values = resample_axis_aligned(image.as_tensor(), scale, shift, shape, mode)
            out = MetaTensor(values, meta=dict(image.meta), applied_operations=list(image.applied_operations))
            out.affine = torch.as_tensor(dst_affine, dtype=torch.float64)
            self.push_transform(
                out, orig_size=list(image.shape[1:]), extra_info={"src_affine": src_affine, "mode": mode}
            )
            d[key] = out
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image: MetaTensor = d[key]
            record = self.get_most_recent_transform(image, check=False)
            if record[TraceKeys.CLASS_NAME] != type(self).__name__:
                d[key] = self.fallback.inverse({key: image})[key]
                continue
            record = self.pop_transform(image)
            src_affine = np.asarray(record[TraceKeys.EXTRA_INFO]["src_affine"], np.float64)
            mode = record[TraceKeys.EXTRA_INFO]["mode"]
            # Invertd's nearest_interp rewrites the recorded mode; label maps come back by nearest lookup.
            mode = mode if mode in _FAST_MODES else "nearest"
            scale, shift = axis_mapping(image.affine.numpy(), src_affine)
            values = resample_axis_aligned(image.as_tensor(), scale, shift, record[TraceKeys.ORIG_SIZE], mode)
            out = MetaTensor(values, meta=dict(image.meta), applied_operations=list(image.applied_operations))
            out.affine = torch.as_tensor(src_affine, dtype=torch.float64)
            d[key] = out
        return d
