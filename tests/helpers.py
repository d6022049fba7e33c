"""Helpers shared by the test modules (test data writers, tiny networks, the inference and evaluation runners,
random weights): one home, imported as ``from helpers import ...``; pytest fixtures stay in ``conftest.py``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from scipy import ndimage

# A structure like the released one (windowed blocks padded to a larger window, global blocks), small enough
# for the deliberately slow plain reference: grid 4 padded to windows of 6.
SMALL_SETTINGS = dict(
    image_size=64,
    patch_size=16,
    encoder_embed_dim=48,
    encoder_depth=3,
    encoder_num_heads=3,
    encoder_global_attn_indexes=(1,),
    window_size=6,
    prompt_embed_dim=48,
    decoder_heads=4,
    decoder_mlp_dim=64,
    mask_in_chans=16,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundle" / "configs"


def reference_config(settings: dict) -> dict:
    """Registry settings -> the config dict of ``tests/plain_reference.py``."""
    from plain_reference import REFERENCE_CONFIG

    return dict(
        REFERENCE_CONFIG,
        image_size=settings["image_size"],
        patch_size=settings["patch_size"],
        embed_dim=settings["encoder_embed_dim"],
        depth=settings["encoder_depth"],
        num_heads=settings["encoder_num_heads"],
        global_attn_indexes=tuple(settings["encoder_global_attn_indexes"]),
        window_size=settings["window_size"],
        out_chans=settings["prompt_embed_dim"],
        decoder_heads=settings["decoder_heads"],
        decoder_mlp_dim=settings["decoder_mlp_dim"],
        mask_in_chans=settings["mask_in_chans"],
        rel_pos_bias=settings.get("rel_pos_bias", "upstream"),
    )


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (position tables, norms and biases included), in place."""
    from custom.networks.common import LayerNorm3d

    gen = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, LayerNorm3d))}
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if id(param) in norm_weights:
                param.copy_(1 + 0.1 * noise)
            elif "rel_pos" in name:
                param.copy_(0.3 * noise)
            elif "pos_embed" in name or param.ndim == 1:
                param.copy_(0.1 * noise)
            else:
                param.add_(0.02 * noise)
    return model


def fit_fixed_batch(network: torch.nn.Module, image: torch.Tensor, target: torch.Tensor, steps: int) -> list[float]:
    """Train ``network`` on one batch with the interactive training forward (3 click steps, one mask-only)
    and the training loss; returns the loss of every step."""
    from monai.losses import DiceCELoss

    from custom.engines import InteractiveSegmentation, parameter_groups, trainable

    model = InteractiveSegmentation(network, num_click_steps=3, mask_only_step_range=(2, 2))
    optimizer = torch.optim.AdamW(parameter_groups(trainable(network), 2e-3, decoder_lr_factor=1.0), weight_decay=0.1)
    loss_function = DiceCELoss(sigmoid=True, squared_pred=True)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        logits = model(image, target, torch.Generator().manual_seed(step))
        loss = sum(loss_function(step_logits, target) for step_logits in logits)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


class ThresholdNetwork(torch.nn.Module):
    """encode: the crop itself; decode: logits ``intensity - 50`` at full resolution, whatever the prompts."""

    def __init__(self, img_size: int = 32) -> None:
        super().__init__()
        self.img_size = img_size
        self.encoded = 0

    def encode(self, crop: torch.Tensor) -> torch.Tensor:
        self.encoded += 1
        return crop

    def decode(self, embedding, point_coords, point_labels, mask_input=None):
        return embedding - 50.0, embedding.new_zeros(embedding.shape[0], 1)


def read_output(out, case):
    image = nib.load(out / case / f"{case}_seg.nii.gz")
    report = json.loads((out / case / f"{case}_seg.json").read_text())
    return np.asarray(image.dataobj), image.affine, report


def run_inference(tmp_path, network, roi_size=32, **overrides):
    """Run bundle/configs/inference.json with ``network`` and a raw-intensity inferer; return the output folder."""
    out = Path(overrides.pop("output_dir", tmp_path / "out"))
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="infer",
        output_dir=str(out),
        network=network,
        **{"predictor#roi_size": roi_size, "predictor#intensity_normalization": None},
        **overrides,
    )
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()
    return out


def write_nifti(path, array, affine) -> str:
    nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64)).to_filename(path)
    return str(path)


def boundary_tolerant_equal(predicted: np.ndarray, expected: np.ndarray) -> bool:
    """Every voxel agrees except, at most, one layer at the object's boundary (no shift, flip or loss)."""
    inner = ndimage.binary_erosion(expected)
    outer = ndimage.binary_dilation(expected)
    return bool(np.all(predicted[inner]) and not np.any(predicted[~outer]))


def bright(shape) -> np.ndarray:
    """An image above the threshold everywhere (not constant: a constant image is refused)."""
    image = np.full(shape, 100.0)
    image.flat[0] = 101.0
    return image


def dicom_volume(depth=12):
    volume = np.full((depth, 16, 18), 10, np.int16)  # z, y, x
    volume[3:9, 4:12, 5:14] = 100
    return volume


def root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def write_dicom_series(folder, volume, spacing=(1.5, 1.5, 3.0), skip=(), description="", prefix="s"):
    """A CT series from ``volume`` (z, y, x) with ImagePositionPatient every ``spacing[2]`` mm (slices listed in
    ``skip`` left out); returns its SeriesInstanceUID."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for k, plane in enumerate(volume):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta, ds.is_little_endian, ds.is_implicit_VR = meta, True, False
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesDescription = study, series, description
        ds.FrameOfReferenceUID = frame
        ds.Modality, ds.PatientName, ds.PatientID, ds.SeriesNumber, ds.InstanceNumber = "CT", "Test", "1", 1, k + 1
        ds.ImagePositionPatient = [0.0, 0.0, k * spacing[2]]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[0]], spacing[2]
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(plane, np.int16).tobytes()
        pydicom.dcmwrite(folder / f"{prefix}{k:03d}.dcm", ds, write_like_original=False)
    return series


def two_blob_volumes():
    first = np.zeros((20, 24, 18), np.uint8)
    first[5:14, 6:18, 4:12] = 1
    second = np.zeros((22, 20, 20), np.uint8)
    second[8:15, 3:10, 9:17] = 1
    return [first, second]


def write_msd_dataset(tmp_path, volumes, spacing=(1.5, 1.5, 1.5)):
    """An MSD-style dataset of (image, label) arrays, images bright where labelled."""
    (tmp_path / "imagesTr").mkdir(parents=True)
    (tmp_path / "labelsTr").mkdir()
    entries = []
    for i, label in enumerate(volumes):
        affine = np.diag([*spacing, 1.0])
        write_nifti(tmp_path / "imagesTr" / f"case{i}.nii.gz", np.where(label > 0, 100.0, 10.0), affine)
        nib.Nifti1Image(label.astype(np.uint8), affine).to_filename(tmp_path / "labelsTr" / f"case{i}.nii.gz")
        entries.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    (tmp_path / "dataset.json").write_text(
        json.dumps({"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "blob"}, "validation": entries})
    )
    return tmp_path


def evaluate(tmp_path, dataset, network, num_clicks=3, **overrides):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "evaluate.json"),
        workflow_type="infer",
        dataset_dir=str(dataset),
        datalist=str(dataset / "dataset.json"),
        output_dir=str(tmp_path / "eval"),
        network=network,
        num_clicks=num_clicks,
        **{"predictor#roi_size": 32, "predictor#intensity_normalization": None},
        **overrides,
    )
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()
    out = tmp_path / "eval"
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return json.loads((out / "summary.json").read_text()), rows
