"""The training workflow: a real epoch through monai.bundle, learning on a fixed batch, exact resume,
datalist checks."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, fit_fixed_batch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from custom.data import load_training_datalist
from custom.networks import build_sam_med3d, load_checkpoint

CONFIGS = REPO_ROOT / "bundle" / "configs"
MINI = REPO_ROOT / "bundle" / "sample" / "hippocampus_mini"
FAST = {"network_name": "sam_med3d_tiny", "network_def#image_size": 64, "num_workers": 0, "batch_size": 2}


def train(tmp_path, stop_after_epoch=None, **overrides):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        workflow_type="train",
        output_dir=str(tmp_path),
        **dict(FAST, **overrides),
    )
    workflow.initialize()
    if stop_after_epoch is not None:  # an interruption: the run ends after the epoch's checkpoint is written
        workflow.parser.get_parsed_content("train#trainer").add_event_handler(
            Events.EPOCH_COMPLETED(once=stop_after_epoch), lambda engine: engine.terminate()
        )
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    optimizer = workflow.parser.get_parsed_content("optimizer")
    workflow.finalize()
    return trainer, optimizer


def test_one_epoch_through_the_bundle_writes_checkpoints(tmp_path):
    trainer, _ = train(tmp_path, epochs=1, val_interval=1)
    assert trainer.state.iteration == 2  # 4 cases, batch 2
    model = build_sam_med3d("sam_med3d_tiny", image_size=64)
    assert load_checkpoint(model, tmp_path / "model.pt").ok  # {"model": ..., "rel_pos_bias": ...}, weights_only
    for name in ("model.pt", "model_latest.pt"):
        assert torch.load(tmp_path / name, weights_only=True)["rel_pos_bias"] == "upstream"  # sam_med3d_tiny's
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    assert {"network", "optimizer", "lr_scheduler", "trainer", "scaler"} <= set(state)
    summary = json.loads((tmp_path / "model.json").read_text())
    assert summary["key_metric"] == "val_dice_5clicks" and set(summary["metrics"]) == {
        "val_dice_1click",
        "val_dice_5clicks",
    }
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_the_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    network = build_sam_med3d("sam_med3d_tiny", image_size=64)
    image = torch.randn(2, 1, 64, 64, 64)
    target = torch.zeros(2, 1, 64, 64, 64)
    target[0, 0, 20:40, 25:45, 10:30] = 1
    target[1, 0, 30:50, 10:30, 30:54] = 1
    image = image + 3 * target
    losses = fit_fixed_batch(network, image, target, steps=30)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_resume_continues_exactly(tmp_path):
    straight, straight_optimizer = train(tmp_path / "straight", epochs=2, val_interval=5)
    interrupted, _ = train(tmp_path / "split", stop_after_epoch=1, epochs=2, val_interval=5)
    assert interrupted.state.iteration == 2
    resumed, resumed_optimizer = train(tmp_path / "split", epochs=2, val_interval=5, resume=True)
    assert resumed.state.iteration == straight.state.iteration == 4
    assert resumed.state.epoch == straight.state.epoch == 2
    steps = [
        [float(s["step"]) for s in opt.state_dict()["state"].values()]
        for opt in (straight_optimizer, resumed_optimizer)
    ]
    assert steps[0] == steps[1] and steps[0] and all(s == 4 for s in steps[0])
    lrs = [[g["lr"] for g in opt.param_groups] for opt in (straight_optimizer, resumed_optimizer)]
    assert lrs[0] == pytest.approx(lrs[1])


def _copy_mini(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(MINI, root)
    return root


def test_datalist_faults_are_all_reported(tmp_path):
    root = _copy_mini(tmp_path)
    datalist = json.loads((root / "dataset.json").read_text())
    (root / "imagesTr" / "hippocampus_001.nii.gz").unlink()
    label = nib.load(root / "labelsTr" / "hippocampus_003.nii.gz")
    nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine).to_filename(
        root / "labelsTr" / "hippocampus_003.nii.gz"
    )
    nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), label.affine).to_filename(
        root / "labelsTr" / "hippocampus_004.nii.gz"
    )
    with pytest.raises(ValueError) as err:
        load_training_datalist(root / "dataset.json", "training")
    message = str(err.value)
    assert "3 of 4 entries are unusable" in message
    assert "hippocampus_001: image" in message and "does not exist" in message
    assert "hippocampus_003: the label has no foreground voxel" in message
    assert "hippocampus_004: label shape (5, 5, 5) does not match image shape" in message
    datalist["training"] = []
    (root / "empty.json").write_text(json.dumps(datalist))
    with pytest.raises(ValueError, match="is empty"):
        load_training_datalist(root / "empty.json", "training")
    with pytest.raises(ValueError, match="'testing'"):
        load_training_datalist(root / "dataset.json", "testing")


def test_checked_entries_list_the_classes_present():
    entries = load_training_datalist(MINI / "dataset.json", "validation")
    assert [e["classes"] for e in entries] == [[1, 2], [1, 2]]


def test_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(REPO_ROOT / "tests" / "ddp_worker.py"),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["iterations"] == ranks[1]["iterations"] == 2
    for key, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][key]), key
    changed = [k for k, v in ranks[0]["final"].items() if not torch.equal(v, ranks[0]["initial"][k])]
    assert "image_encoder.blocks.0.attn.qkv.weight" in changed and "mask_decoder.iou_token.weight" in changed


def test_clamping_follows_the_dataset_modality():
    from custom.transforms import ClampByModalityd

    image = torch.tensor([[-3000.0, 0.0, 2500.0]])
    clamp = ClampByModalityd(keys="image")
    assert clamp({"image": image, "modality": "CT"})["image"].tolist() == [[-1000.0, 0.0, 1000.0]]
    assert clamp({"image": image, "modality": "MRI"})["image"].tolist() == image.tolist()


@pytest.mark.parametrize("jitter_mm", [0.0, 6.0])
def test_training_window_is_centred_on_the_target(jitter_mm):
    from monai.data import MetaTensor
    from monai.transforms import Compose, ResizeWithPadOrCropd, Spacingd

    from custom.transforms import CropAroundTargetd, SelectTargetd

    affine = torch.diag(torch.tensor([0.9, 1.2, 2.5, 1.0], dtype=torch.float64))
    label = torch.zeros(1, 80, 60, 30)
    label[0, 50:60, 10:20, 5:9] = 2
    label[0, 5:9, 40:50, 20:25] = 1
    image = torch.randn(1, 80, 60, 30)
    pipeline = Compose(
        [
            SelectTargetd(keys="label"),
            CropAroundTargetd(keys=["image", "label"], roi_size=32, spacing_mm=1.5, jitter_mm=jitter_mm),
            Spacingd(keys=["image", "label"], pixdim=(1.5, 1.5, 1.5), mode=["bilinear", "nearest"]),
            ResizeWithPadOrCropd(keys=["image", "label"], spatial_size=(32, 32, 32)),
        ]
    )
    pipeline.set_random_state(seed=0)
    for _ in range(4):
        out = pipeline(
            {
                "image": MetaTensor(image, affine=affine),
                "label": MetaTensor(label, affine=affine),
                "target_class": 2,
                "classes": [1, 2],
            }
        )
        assert out["image"].shape == out["label"].shape == (1, 32, 32, 32)
        target = torch.nonzero(out["label"][0] > 0.5).float()
        assert len(target) > 0 and set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}
        centre = (target.min(0).values + target.max(0).values) / 2
        assert torch.all((centre - 15.5).abs() <= jitter_mm / 1.5 + 1.5), centre
