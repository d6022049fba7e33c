"""AxisAlignedSpacingd against MONAI's Spacingd: same grid, affine and values, forward and through Invertd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, Spacingd

from custom.spacing import AxisAlignedSpacingd, axis_mapping

PIXDIM = (1.5, 1.5, 1.5)


def _volume(affine: np.ndarray, shape=(37, 45, 23), seed: int = 0) -> MetaTensor:
    values = torch.from_numpy(np.random.default_rng(seed).normal(0, 100, (1, *shape)).astype(np.float32))
    return MetaTensor(values, affine=torch.as_tensor(affine, dtype=torch.float64))


def _labels_like(image: MetaTensor) -> torch.Tensor:
    """A blocky multi-label map on ``image``'s grid (nearest lookups must carry it exactly)."""
    d, h, w = image.shape[1:]
    grid = torch.stack(torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij"))
    return (((grid[0] // 5) + (grid[1] // 7) * 3 + (grid[2] // 4)) % 4).to(torch.uint8)[None]


AXIS_ALIGNED = {
    "ct_like": np.diag([0.8, 0.8, 5.0, 1.0]),
    "flipped_and_shifted": np.array([[-0.9, 0, 0, 40.0], [0, 1.3, 0, -12.5], [0, 0, 2.5, 7.0], [0, 0, 0, 1]]),
    # axes already at the target spacing keep their voxels (the resampler skips them): one plain, one flipped
    "two_axes_at_target": np.array([[0.8, 0, 0, 3.0], [0, -1.5, 0, 20.0], [0, 0, 1.5, -4.0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("affine", AXIS_ALIGNED.values(), ids=AXIS_ALIGNED.keys())
def test_forward_equals_spacingd(affine):
    image = _volume(affine)
    reference = Spacingd("image", PIXDIM, mode="bilinear", dtype=torch.float32)({"image": image})["image"]
    fast = AxisAlignedSpacingd("image", PIXDIM)({"image": image})["image"]
    assert fast.shape == reference.shape
    assert torch.allclose(fast.affine, reference.affine.to(torch.float64), atol=1e-6)
    assert (fast.as_tensor() - reference.as_tensor()).abs().max() < 1e-3 * image.abs().max()

    labels = MetaTensor(_labels_like(image), affine=image.affine)
    ref_labels = Spacingd("label", PIXDIM, mode="nearest")({"label": labels})["label"]
    fast_labels = AxisAlignedSpacingd("label", PIXDIM, mode="nearest")({"label": labels})["label"]
    assert fast_labels.dtype == torch.uint8
    assert torch.equal(fast_labels.as_tensor(), ref_labels.as_tensor().to(torch.uint8))


@pytest.mark.parametrize("affine", AXIS_ALIGNED.values(), ids=AXIS_ALIGNED.keys())
def test_prediction_inverts_onto_the_original_grid_like_spacingd(affine):
    image = _volume(affine)
    results = []
    for transform in (
        Spacingd("image", PIXDIM, mode="bilinear", dtype=torch.float32),
        AxisAlignedSpacingd("image", PIXDIM),
    ):
        pipeline = Compose([transform])
        resampled = pipeline({"image": image})["image"]
        pred = MetaTensor(
            _labels_like(resampled), meta=dict(resampled.meta), applied_operations=list(resampled.applied_operations)
        )
        inverted = Invertd("pred", pipeline, orig_keys="image", nearest_interp=True)(
            {"pred": pred, "image": resampled}
        )["pred"]
        assert inverted.shape == image.shape
        assert torch.allclose(inverted.affine.to(torch.float64), image.affine, atol=1e-6)
        results.append(inverted.as_tensor().to(torch.uint8))
    assert torch.equal(results[0], results[1])


def test_oblique_scan_keeps_its_directions_so_the_fast_path_applies():
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 0.9, 2.0])
    image = _volume(affine)
    fast = AxisAlignedSpacingd("image", PIXDIM)({"image": image})["image"]
    assert fast.applied_operations[-1]["class"] == "AxisAlignedSpacingd"
    reference = Spacingd("image", PIXDIM, mode="bilinear", dtype=torch.float32)({"image": image})["image"]
    assert fast.shape == reference.shape
    assert torch.allclose(fast.affine, reference.affine.to(torch.float64), atol=1e-6)
    assert (fast.as_tensor() - reference.as_tensor()).abs().max() < 1e-3 * image.abs().max()
    # axes that mix cannot be resampled per axis
    assert axis_mapping(affine, np.diag([1.5, 1.5, 1.5, 1.0])) is None


def test_other_modes_fall_back_to_spacingd_and_invert():
    image = _volume(AXIS_ALIGNED["ct_like"])
    pipeline = Compose([AxisAlignedSpacingd("image", PIXDIM, mode=1)])
    out = pipeline({"image": image})["image"]
    assert out.applied_operations[-1]["class"] != "AxisAlignedSpacingd"
    reference = Spacingd("image", PIXDIM, mode=1, dtype=torch.float32)({"image": image})["image"]
    assert torch.allclose(out.as_tensor(), reference.as_tensor(), atol=1e-3)
    back = Invertd("image", pipeline, nearest_interp=False)({"image": out})["image"]
    assert back.shape == image.shape and torch.allclose(back.affine.to(torch.float64), image.affine, atol=1e-6)


def test_unknown_mode_is_named():
    from custom.spacing import resample_axis_aligned

    with pytest.raises(ValueError, match="'bicubic'"):
        resample_axis_aligned(torch.zeros(1, 4, 4, 4), (1, 1, 1), (0, 0, 0), (4, 4, 4), "bicubic")


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_an_axis_at_the_target_spacing_is_not_resampled(mode, monkeypatch):
    """Identity source coordinates cost no lookups: the values come back unchanged, in a new tensor."""
    from custom.spacing import resample_axis_aligned

    values = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).reshape(1, 2, 3, 1) * 1.5
    for shape in ((1, 2, 3, 1), (1, 1, 1, 9)):
        volume = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
        lookups = []
        original = torch.Tensor.index_select
        monkeypatch.setattr(torch.Tensor, "index_select", lambda t, *a: lookups.append(a) or original(t, *a))
        out = resample_axis_aligned(volume, (1, 1, 1), (0, 0, 0), shape[1:], mode)
        monkeypatch.undo()
        assert lookups == [] and torch.equal(out, volume) and out.data_ptr() != volume.data_ptr()
    # a shift by whole voxels is a lookup, not the identity
    out = resample_axis_aligned(values, (1, 1, 1), (1, 0, 0), (2, 3, 1), mode)
    assert torch.equal(out[0, 0], values[0, 1]) and torch.equal(out[0, 1], values[0, 1])  # clamped at the border
