"""The network's input is prepared once: train.json's transforms and the predictor give the same network-grid
volume, and that volume is the stored one clamped and reoriented as an independent reading (nibabel) says."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from helpers import CONFIGS, ThresholdNetwork, write_nifti
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from custom.predictor import VolumetricPredictor


def _config(name: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / name))
    return parser


def _ct_volume(tmp_path, spacing):
    rng = np.random.default_rng(0)
    values = rng.uniform(-3000, 3000, (20, 18, 14)).astype(np.float32)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-like: two axes flipped against RAS
    affine[:3, 3] = [12.0, -4.0, 30.0]
    return write_nifti(tmp_path / "ct.nii.gz", values, affine), values, affine


def test_the_predictor_prepares_the_image_as_training_does(tmp_path):
    train, inference = _config("train.json"), _config("inference.json")
    network_input = train.get_parsed_content("network_input")
    # the two configs declare the same preparation
    assert list(network_input.spacing_mm) == [float(s) for s in inference["spacing_mm"]]
    assert network_input.clamp_ranges == {
        k.upper(): tuple(v) for k, v in inference["intensity_clamp_by_modality"].items()
    }
    path, _, _ = _ct_volume(tmp_path, spacing=(1.1, 0.9, 2.3))  # resampling is not the identity
    training = Compose(
        [
            LoadImaged("image", image_only=True),
            EnsureChannelFirstd("image"),
            network_input.stored_grid("image"),
            network_input.resampling("image", "bilinear"),
        ]
    )({"image": path, "modality": "CT"})["image"]
    predictor = inference.get_parsed_content("predictor")(ThresholdNetwork())
    predictor.set_image(path, modality="CT")
    assert predictor.image.shape == training.shape[1:]
    torch.testing.assert_close(predictor.image, training[0].float(), rtol=0, atol=0)
    assert float(training.max()) <= 1000 and float(training.min()) >= -1000 and float(training.max()) > 900
    # an MR image is not clamped
    predictor.set_image(path, modality="MR")
    assert float(predictor.image.max()) > 1000


def test_the_stored_voxels_are_clamped_and_oriented_as_nibabel_says_and_the_callers_tensor_stays(tmp_path):
    path, values, affine = _ct_volume(tmp_path, spacing=(1.5, 1.5, 1.5))  # at the network's spacing: no resampling
    canonical = nib.as_closest_canonical(nib.load(path))
    expected = np.clip(np.asarray(canonical.dataobj, np.float32), -1000, 1000)
    predictor = VolumetricPredictor(ThresholdNetwork(), intensity_clamp_by_modality={"CT": (-1000, 1000)})
    image = MetaTensor(torch.as_tensor(values)[None].clone(), affine=torch.as_tensor(affine))
    before = image.clone()
    predictor.set_image(image, modality="ct")
    np.testing.assert_allclose(predictor.image.numpy(), expected, atol=1e-3)
    np.testing.assert_allclose(predictor.grid.network_affine[:3, :3], canonical.affine[:3, :3], atol=1e-6)
    assert torch.equal(image.as_tensor(), before.as_tensor())  # clamped into a copy, not the caller's volume
    ras = MetaTensor(torch.as_tensor(expected.copy() * 3)[None], affine=torch.as_tensor(canonical.affine))
    kept = ras.clone()
    predictor.set_image(ras, modality="CT")  # already RAS: orientation hands back the same storage
    assert torch.equal(ras.as_tensor(), kept.as_tensor())


def test_training_caches_the_whole_deterministic_part():
    from monai.transforms import RandomizableTrait, Transform

    from custom.preprocessing import StoredGridd

    cached = _config("train.json").get_parsed_content("cached_transforms")
    # CacheDataset keeps the transforms before the first random (or non-Transform) one: all of these
    first_random = cached.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
    assert first_random is None, cached.transforms[first_random]
    assert any(isinstance(t, StoredGridd) for t in cached.transforms)
