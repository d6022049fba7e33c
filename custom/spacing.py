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


def source_coordinates(scale: float, shift: float, n_out: int, n_in: int) -> torch.Tensor:
    """``(n_out,)`` float64 source coordinates ``scale * o + shift`` of output voxels ``o``, clamped to the
    source's ``n_in`` voxels (``grid_sample``'s border padding). Nearest neighbour rounds them half to even,
    as ``grid_sample`` does: every resampling and every paste-back of this bundle goes through here."""
    return (scale * torch.arange(n_out, dtype=torch.float64) + shift).clamp(0, n_in - 1)


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
        coords = source_coordinates(s, t, n_out, n_in)
        if torch.equal(coords, torch.arange(n_in, dtype=coords.dtype)):
            pass  # the axis keeps its voxels (a scan already at the target spacing): only the rotation is needed
        elif mode == "nearest":
            out = out.index_select(1, coords.round().long().to(image.device))
        else:
            lower = coords.floor().clamp(max=max(n_in - 2, 0)).long()
            weight = (coords - lower).to(torch.float32).reshape(1, n_out, 1, 1).to(image.device)
            upper = (lower + 1).clamp(max=n_in - 1).to(image.device)
            lower = lower.to(image.device)
            out = out.index_select(1, lower).lerp_(out.index_select(1, upper), weight)
        out = out.permute(0, 2, 3, 1).contiguous()
    # every axis kept and the rotations all views (size-1 axes): still a new tensor, as every other call returns
    return out.clone() if out.data_ptr() == image.data_ptr() else out


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

    def target_grid(self, image: MetaTensor) -> tuple[np.ndarray, list[int]]:
        """The affine and spatial shape ``Spacingd`` gives ``image``, computed without resampling."""
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
            if image.pending_operations or axis_mapping(image.affine.numpy(), self.target_grid(image)[0]) is None:
                return False
        return True

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self._fast_path_applies(d):
            return self.fallback(d)
        for key, mode in self.key_iterator(d, self.mode):
            image: MetaTensor = d[key]
            src_affine = image.affine.numpy().astype(np.float64)
            dst_affine, shape = self.target_grid(image)
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


class NetworkGrid:
    """The geometry between a volume's stored grid and the network's grid (RAS, ``spacing``): converting
    points, and pasting predictions back by nearest neighbour.

    Orientation to RAS permutes and flips axes, and ``Spacingd`` keeps the axis directions, so each stored axis
    maps onto one network axis by a scale and a shift: the paste-back is three index lookups of length
    ``D + H + W`` (no per-voxel coordinate arrays), and a region of the network grid maps to a box of the
    stored grid.

    Args:
        stored_affine, stored_shape: voxel -> world (4 x 4) and spatial shape of the grid the volume is stored on.
        network_affine, network_shape: the same for the network's grid.

    Raises:
        ValueError: the grids are not axis-aligned to each other (naming both affines).
    """

    def __init__(
        self,
        stored_affine: np.ndarray | torch.Tensor,
        stored_shape: Sequence[int],
        network_affine: np.ndarray | torch.Tensor,
        network_shape: Sequence[int],
    ) -> None:
        self.stored_affine = np.asarray(stored_affine, np.float64)
        self.network_affine = np.asarray(network_affine, np.float64)
        self.stored_shape = tuple(int(s) for s in stored_shape)
        self.network_shape = tuple(int(s) for s in network_shape)
        self.stored_to_network_matrix = np.linalg.solve(self.network_affine, self.stored_affine)
        linear = self.stored_to_network_matrix[:3, :3]
        #: the network axis each stored axis lies along
        self.network_axis = [int(np.argmax(np.abs(linear[:, a]))) for a in range(3)]
        mixed = linear.copy()
        mixed[self.network_axis, range(3)] = 0
        if sorted(self.network_axis) != [0, 1, 2] or np.abs(mixed).max() > _AXIS_ALIGNED_TOL * np.abs(linear).max():
            raise ValueError(
                "the network grid is not axis-aligned to the stored grid (stored affine "
                f"{self.stored_affine.tolist()}, network affine {self.network_affine.tolist()})"
            )
        # nearest network index of every stored index, per stored axis
        self._nearest = [
            source_coordinates(linear[p, a], self.stored_to_network_matrix[p, 3], n, self.network_shape[p])
            .round()
            .long()
            for a, (p, n) in enumerate(zip(self.network_axis, self.stored_shape))
        ]

    def stored_to_network(self, points: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(N, 3)`` voxel indices of the stored grid -> float voxel coordinates of the network grid."""
        points = np.asarray(points, np.float64).reshape(-1, 3)
        mapped = points @ self.stored_to_network_matrix[:3, :3].T + self.stored_to_network_matrix[:3, 3]
        return torch.as_tensor(mapped, dtype=torch.float32)

    def stored_box(self, network_box: Sequence[tuple[int, int]]) -> list[tuple[int, int]] | None:
        """The box of stored voxels whose nearest network voxel lies in ``network_box`` (``[lo, hi)`` per
        network axis); None if empty. Returned per stored axis, ``[lo, hi)``."""
        box = []
        for a, p in enumerate(self.network_axis):
            lo, hi = network_box[p]
            inside = torch.nonzero((self._nearest[a] >= lo) & (self._nearest[a] < hi))
            if len(inside) == 0:
                return None
            box.append((int(inside[0]), int(inside[-1]) + 1))
        return box

    def paste(
        self,
        region: torch.Tensor,
        network_box: Sequence[tuple[int, int]],
        out: torch.Tensor,
        origin: Sequence[int] = (0, 0, 0),
    ) -> None:
        """Write a network-grid ``region`` (the values over ``network_box``) into ``out`` by nearest neighbour,
        over the stored box it covers; ``out`` is the stored grid, or the part of it from stored voxel ``origin``."""
        box = self.stored_box(network_box)
        if box is None:
            return
        box = [(max(lo, o), min(hi, o + n)) for (lo, hi), o, n in zip(box, origin, out.shape)]
        if any(hi <= lo for lo, hi in box):
            return
        values = region.permute(*self.network_axis)  # stored axis order, network indices
        for a, (lo, hi) in enumerate(box):
            start = network_box[self.network_axis[a]][0]
            values = values.index_select(a, (self._nearest[a][lo:hi] - start).to(values.device))
        out[tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, origin))] = values.to(out.device, out.dtype)
