"""How a stored volume becomes the network's input, written once for the training transforms and the predictor.

On the stored voxels the volume is oriented to RAS and its intensities are clamped by modality (before any
resampling: a bilinear sample of an unclamped -3000 next to a 1000 would be a value the network never saw); it is
resampled to the network's spacing (the image bilinear, labels nearest, :class:`~custom.spacing.AxisAlignedSpacingd`);
each network window is normalised on its own (:func:`~custom.window.normalize_crop`, upstream's z-score).
``train.json`` builds its transform lists from a :class:`NetworkInput` and the
:class:`~custom.predictor.VolumetricPredictor` prepares its image with one built from its settings, so the two
cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Orientationd
from monai.utils import ensure_tuple

from .spacing import AxisAlignedSpacingd
from .window import normalize_crop


class ClampByModalityd(MapTransform):
    """Clamp intensities to the range given for the item's modality (``ranges["CT"] = (-1000, 1000)`` as in
    upstream training); other modalities pass unchanged. The modality comes from the dataset, not the path.

    Args:
        in_place: clamp the item's own tensor (training's cached volumes: no second copy of a whole volume);
            False leaves the caller's tensor untouched (the predictor's).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        modality_key: str = "modality",
        ranges: Mapping[str, Sequence[float]] | None = None,
        in_place: bool = True,
    ) -> None:
        super().__init__(keys)
        self.modality_key = modality_key
        self.ranges = {
            k.upper(): tuple(v) for k, v in (ranges if ranges is not None else {"CT": (-1000, 1000)}).items()
        }
        self.in_place = in_place

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        bounds = self.ranges.get(str(d.get(self.modality_key, "")).upper())
        if bounds is not None:
            for key in self.key_iterator(d):
                d[key] = d[key].clamp_(*bounds) if self.in_place else d[key].clamp(*bounds)
        return d


class NormalizeCropd(MapTransform):
    """A window's intensity normalisation (default upstream's :func:`normalize_crop`) on each sample."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        normalization: Callable[[torch.Tensor], torch.Tensor] = normalize_crop,
    ) -> None:
        super().__init__(keys)
        self.normalization = normalization

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalization(d[key])
        return d


class StoredGridd(MapTransform):
    """Orient the image (and labels) to RAS, then clamp the image by the item's modality: one deterministic
    transform (a nested ``Compose`` counts as random to ``CacheDataset``, which would stop caching before it)."""

    def __init__(
        self,
        image_key: str | None = "image",
        label_keys: KeysCollection = (),
        modality_key: str = "modality",
        ranges: Mapping[str, Sequence[float]] | None = None,
        in_place: bool = True,
    ) -> None:
        keys = [k for k in [image_key, *ensure_tuple(label_keys)] if k is not None]
        super().__init__(keys)
        self.orient = Orientationd(keys, axcodes="RAS", labels=None)
        self.clamp = ClampByModalityd(image_key, modality_key, ranges or {}, in_place) if image_key else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = self.orient(data)
        return self.clamp(d) if self.clamp is not None else dict(d)


class NetworkInput:
    """The preprocessing of the network's input: its settings and, from them, the transforms of each stage.

    Args:
        spacing_mm: the network grid's voxel size (mm), one for all axes or one per axis.
        intensity_clamp_by_modality: modality -> (low, high) (``{"CT": (-1000, 1000)}``); None: no clamping.
        intensity_normalization: applied to each window before encoding (default :func:`normalize_crop`, as
            upstream); None passes the resampled intensities.
    """

    def __init__(
        self,
        spacing_mm: Sequence[float] | float = 1.5,
        intensity_clamp_by_modality: Mapping[str, Sequence[float]] | None = None,
        intensity_normalization: Callable[[torch.Tensor], torch.Tensor] | None = normalize_crop,
    ) -> None:
        self.spacing_mm = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing_mm, float), 3))
        self.clamp_ranges = {k.upper(): tuple(v) for k, v in (intensity_clamp_by_modality or {}).items()}
        self.intensity_normalization = intensity_normalization

    def stored_grid(
        self,
        image_key: str | None = "image",
        label_keys: KeysCollection = (),
        modality_key: str = "modality",
        in_place: bool = True,
    ) -> StoredGridd:
        """On the stored voxels: the image (and labels) oriented to RAS, the image clamped by the item's modality
        (``in_place=False`` leaves the caller's tensor untouched)."""
        return StoredGridd(image_key, label_keys, modality_key, self.clamp_ranges, in_place)

    def resampling(self, keys: KeysCollection = "image", mode: Sequence[str] | str = "bilinear") -> AxisAlignedSpacingd:
        """To the network's spacing: ``"bilinear"`` for images, ``"nearest"`` for labels (one per key or one)."""
        return AxisAlignedSpacingd(keys, self.spacing_mm, mode=mode)

    def window_normalization(self, keys: KeysCollection = "image") -> NormalizeCropd:
        """Each window's intensities normalised (:meth:`normalize_window`)."""
        return NormalizeCropd(keys, self.normalize_window)

    def normalize_window(self, crop: torch.Tensor) -> torch.Tensor:
        """One window tensor normalised (unchanged when ``intensity_normalization`` is None)."""
        return crop if self.intensity_normalization is None else self.intensity_normalization(crop)
