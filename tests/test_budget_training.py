"""The scripts that trained the shipped model on a lent GPU: the compact dataset copy and the time-boxed run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundle"
SAMPLE = BUNDLE / "sample" / "hippocampus_mini"


def _ct_dataset(root: Path) -> Path:
    """A 40^3 CT at 2 mm with one labelled cube, values from -3000 to 3000 HU."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    image = rng.uniform(-3000, 3000, (40, 40, 40)).astype(np.float32)
    label = np.zeros((40, 40, 40), np.uint8)
    label[18:22, 18:22, 18:22] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-10, 5, 7)
    nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / "ct_1.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / "ct_1.nii.gz")
    meta = {
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "cube"},
        "training": [{"image": "imagesTr/ct_1.nii.gz", "label": "labelsTr/ct_1.nii.gz"}],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_the_compact_copy_keeps_geometry_labels_and_intensities_within_half_a_step(tmp_path):
    src = _ct_dataset(tmp_path / "src")
    subprocess.run(
        [
            sys.executable,
            str(BUNDLE / "scripts/compact_dataset.py"),
            "--src",
            str(src),
            "--dst",
            str(tmp_path / "dst"),
            "--margin_mm",
            "10",
        ],
        check=True,
    )
    copy = json.loads((tmp_path / "dst" / "dataset.json").read_text())
    assert copy["labels"] == {"0": "background", "1": "cube"} and copy["modality"] == {"0": "CT"}
    image = nib.load(tmp_path / "dst" / copy["training"][0]["image"])
    label = nib.load(tmp_path / "dst" / copy["training"][0]["label"])
    # the cube at voxels 18..21 plus 10 mm = 5 voxels each side: voxels 13..26
    assert image.shape == label.shape == (14, 14, 14)
    assert image.get_data_dtype() == np.int8 and label.get_data_dtype() == np.uint8
    expected_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    expected_affine[:3, 3] = (-10 + 26, 5 + 26, 7 + 26)
    np.testing.assert_allclose(image.affine, expected_affine)
    original = nib.load(src / "imagesTr" / "ct_1.nii.gz").get_fdata()[13:27, 13:27, 13:27]
    stored = image.get_fdata()  # the slope is applied by the reader
    np.testing.assert_allclose(stored, np.clip(original, -1000, 1000), atol=4.0 + 1e-3)
    assert np.asarray(label.dataobj)[5:9, 5:9, 5:9].all() and np.asarray(label.dataobj).sum() == 64
    assert not list((tmp_path / "dst").rglob("*.tmp*"))


class _StepClock:
    """A clock that advances a fixed step per reading: the time-boxed run becomes a function of its own work."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def _train_for_10_steps(out, **settings) -> list[dict]:
    """``train_for`` on the shipped sample for 10 readings of a step clock (2 calibration iterations)."""
    sys.path.insert(0, str(BUNDLE / "scripts"))
    from train_for import train_for

    return train_for(
        seconds=10,
        output_dir=str(out),
        calibration_iterations=2,
        clock=_StepClock(1.0),
        datalist=str(SAMPLE / "dataset.json"),
        num_workers=0,
        progress_bar=False,
        **settings,
    )


@pytest.mark.slow
def test_a_time_boxed_run_fits_its_schedule_to_the_budget_and_keeps_the_best(tmp_path):
    out = tmp_path / "run"
    started = time.perf_counter()
    history = _train_for_10_steps(out, validate_every_s=3, val_max_targets=2)
    real_seconds = time.perf_counter() - started
    assert json.loads((out / "history.json").read_text()) == history
    assert len(history) >= 2, history  # at least one timed validation and the final one
    assert all("val_dice_1click" in row and "val_dice_5clicks" in row for row in history)
    # where the time went (Ignite's profiler, real time: the step clock above only drives the budget): the batch
    # (num_workers=0, tiny crops) is a small part of the iteration, and the iterations fit in the run's real time
    assert all(0 < row["data_s_per_iteration"] < 0.5 * row["iteration_s"] for row in history)
    assert history[-1]["iteration_s"] * history[-1]["iteration"] < real_seconds
    assert history[-1]["lr"] < 0.2 * 8e-4, "the cosine schedule was not fitted to the budget"
    assert history[-2]["lr"] > history[-1]["lr"]
    best = json.loads((out / "model.json").read_text())
    assert best["best_metric"] == max(row["val_dice_1_and_5"] for row in history)
    for name in ("model.pt", "model_final.pt"):
        payload = torch.load(out / name, weights_only=True)
        assert payload["rel_pos_bias"] == "decomposed" and len(payload["model"]) > 200
    assert not (out / "training_state.pt").exists()


@pytest.mark.slow
def test_a_fixed_iteration_count_keeps_an_earlier_runs_schedule(tmp_path):
    """``iterations`` repeats a schedule instead of fitting it to the time: stopped by the same budget long before
    its end, the learning rate is still near its peak (fitted, it would have decayed to under a fifth)."""
    sys.path.insert(0, str(BUNDLE / "scripts"))
    from train_for import train_for

    history = _train_for_10_steps(tmp_path / "run", validate_every_s=100, val_max_targets=1, iterations=1000)
    assert history[-1]["iteration"] < 20 and history[-1]["lr"] > 0.9 * 8e-4
    with pytest.raises(ValueError, match="iterations"):
        train_for(seconds=10, output_dir=str(tmp_path / "bad"), iterations=0)
