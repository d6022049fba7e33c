"""The training workflow: a real epoch through monai.bundle, learning on a fixed batch, exact resume,
datalist checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import CONFIGS, REPO_ROOT, fit_fixed_batch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from custom.data import load_training_datalist
from custom.networks import build_sam_med3d, load_weights

MINI = REPO_ROOT / "bundle" / "sample" / "hippocampus_mini"
FAST = {
    "network_name": "sam_med3d_tiny",
    "network_def#image_size": 64,
    "pretrained_ckpt": None,
    "num_workers": 0,
    "batch_size": 2,
    "progress_bar": False,
}


def train(tmp_path, stop_after_iteration=None, **overrides):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        workflow_type="train",
        output_dir=str(tmp_path),
        **dict(FAST, **overrides),
    )
    workflow.initialize()
    if stop_after_iteration is not None:  # an interruption, right after that iteration's checkpoint
        workflow.parser.get_parsed_content("train#trainer").add_event_handler(
            Events.ITERATION_COMPLETED(once=stop_after_iteration), lambda engine: engine.terminate()
        )
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    optimizer = workflow.parser.get_parsed_content("optimizer")
    network = workflow.parser.get_parsed_content("network")
    workflow.finalize()
    return trainer, optimizer, network


def test_one_epoch_through_the_bundle_writes_checkpoints(tmp_path):
    trainer, _, _ = train(tmp_path, epochs=1, val_interval=1)
    assert trainer.state.iteration == 2  # 4 cases, batch 2
    model = build_sam_med3d("sam_med3d_tiny", image_size=64)
    assert load_weights(model, tmp_path / "model.pt").ok  # {"model": ..., "rel_pos_bias": ...}, weights_only
    for name in ("model.pt", "model_latest.pt"):
        assert torch.load(tmp_path / name, weights_only=True)["rel_pos_bias"] == "upstream"  # sam_med3d_tiny's
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    assert {"network", "optimizer", "lr_scheduler", "trainer", "scaler"} <= set(state)
    summary = json.loads((tmp_path / "model.json").read_text())
    assert summary["key_metric"] == "val_dice_1_and_5" and set(summary["metrics"]) == {
        "val_dice_1_and_5",
        "val_dice_1click",
        "val_dice_5clicks",
        "val_gain_1_to_5",
    }
    # one event file for the run (the trainer's and the evaluator's handlers share a writer) with the loss and
    # the validation Dice after each reported click step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p for p in tmp_path.iterdir() if p.name.startswith("events.out.tfevents")]
    assert len(events) == 1, events
    tags = EventAccumulator(str(events[0])).Reload().Tags()["scalars"]
    assert {"train_loss", "val_dice_1click", "val_dice_5clicks", "val_gain_1_to_5"} <= set(tags), tags


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


def test_resume_mid_epoch_continues_exactly(tmp_path):
    # 4 cases, batch 2: 2 iterations per epoch; the interruption comes in the middle of epoch 2
    settings = dict(epochs=3, val_interval=2, checkpoint_every_n_iterations=1, crop_jitter_mm=6.0)
    straight, straight_optimizer, straight_network = train(tmp_path / "straight", **settings)
    interrupted, _, _ = train(tmp_path / "split", stop_after_iteration=3, **settings)
    assert interrupted.state.iteration == 3
    resumed, resumed_optimizer, resumed_network = train(tmp_path / "split", resume=True, **settings)
    assert resumed.state.iteration == straight.state.iteration == 6 and resumed.state.epoch == 3
    worst = max(
        (a - b).abs().max().item()
        for a, b in zip(straight_network.state_dict().values(), resumed_network.state_dict().values())
    )
    assert worst <= 1e-6, worst
    moments = [
        (a[key] - b[key]).abs().max().item()
        for a, b in zip(
            straight_optimizer.state_dict()["state"].values(), resumed_optimizer.state_dict()["state"].values()
        )
        for key in ("exp_avg", "exp_avg_sq")
    ]
    assert moments and max(moments) <= 1e-6, max(moments)
    assert [g["lr"] for g in straight_optimizer.param_groups] == pytest.approx(
        [g["lr"] for g in resumed_optimizer.param_groups]
    )
    # the weights differ from the start: the comparison is not of two untrained networks
    assert (
        straight_network.state_dict()["mask_decoder.iou_token.weight"]
        != build_sam_med3d("sam_med3d_tiny", image_size=64).state_dict()["mask_decoder.iou_token.weight"]
    ).any()


def test_a_fresh_run_into_a_used_folder_is_refused(tmp_path):
    train(tmp_path, epochs=1, val_interval=1)
    with pytest.raises(RuntimeError) as err:
        train(tmp_path, epochs=1, val_interval=1)
    cause = err.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, FileExistsError) and "--resume True" in str(cause) and "model.pt" in str(cause)


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


def _torchrun(tmp_path, port: int, **overrides) -> list[dict]:
    """Train with the multi-GPU overlay on 2 CPU processes (gloo); each rank's saved state."""
    import os
    import subprocess
    import sys

    settings = {**FAST, "batch_size": 1, "epochs": 2, "val_interval": 1, **overrides}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += [str(REPO_ROOT / "tests" / "ddp_worker.py"), str(tmp_path), json.dumps(settings)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def _single_process_validation(state: dict, tmp_path) -> dict:
    """The same validation in one process, on the given weights."""
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), workflow_type="train", output_dir=str(tmp_path), **FAST
    )
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network")
    network.load_state_dict(state)
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    return dict(evaluator.state.metrics), evaluator.state.iteration


@pytest.mark.slow
def test_ddp_validates_every_epoch_and_matches_one_process(tmp_path):
    ranks = _torchrun(tmp_path / "ddp", 29517)
    assert ranks[0]["iterations"] == ranks[1]["iterations"] == 4  # 4 cases, 2 ranks, batch 1, 2 epochs
    for key, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][key]), key
    changed = [k for k, v in ranks[0]["final"].items() if not torch.equal(v, ranks[0]["initial"][k])]
    assert "image_encoder.blocks.0.attn.qkv.weight" in changed and "mask_decoder.iou_token.weight" in changed
    assert len(ranks[0]["metrics"]) == len(ranks[1]["metrics"]) == 2  # validated after both epochs, no hang
    assert ranks[0]["metrics"][-1] == ranks[1]["metrics"][-1]  # reduced across ranks
    single, items = _single_process_validation(ranks[0]["final"], tmp_path / "single")
    assert ranks[0]["validated_items"] + ranks[1]["validated_items"] == items  # each rank its share
    for name, value in single.items():
        assert ranks[0]["metrics"][-1][name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.slow
def test_ddp_with_a_frozen_encoder_and_accumulation(tmp_path):
    ranks = _torchrun(tmp_path, 29518, freeze_image_encoder=True, accumulation_steps=2, val_interval=5)
    for key, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][key]), key
        if key.startswith("image_encoder.") and ranks[0]["requires_grad"].get(key) is not None:
            assert not ranks[0]["requires_grad"][key] and torch.equal(value, ranks[0]["initial"][key]), key
    assert not torch.equal(
        ranks[0]["final"]["mask_decoder.iou_token.weight"], ranks[0]["initial"]["mask_decoder.iou_token.weight"]
    )


@pytest.mark.slow
def test_ddp_trains_3dmedsam(tmp_path):
    small = {
        "network_def#encoder_embed_dim": 96,
        "network_def#encoder_depth": 4,
        "network_def#encoder_num_heads": 2,
        "network_def#skip_depths": [3, 1],
        "network_def#prompt_embed_dim": 64,
        "network_def#decoder_mlp_dim": 128,
        "network_def#image_size": 32,
        "window_max_offset_mm": 16.0,  # a 32^3 window at 1.5 mm keeps the click inside up to 22.5 mm
    }
    ranks = _torchrun(tmp_path, 29519, network_name="medsam3d_adapter", val_interval=5, **small)
    frozen = [k for k, trains in ranks[0]["requires_grad"].items() if not trains]
    assert "image_encoder.blocks.0.attn.qkv.weight" in frozen
    for key, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][key]), key
    for key in frozen:
        assert torch.equal(ranks[0]["final"][key], ranks[0]["initial"][key]), key


def test_clamping_follows_the_dataset_modality():
    from custom.preprocessing import ClampByModalityd

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


def test_plain_image_label_entries_train_and_evaluate(tmp_path):
    # how MONAI Label and MONAI FL pass data: no classes, no modality, straight into train#dataset#data
    entries = [
        {
            "image": str(MINI / "imagesTr" / f"hippocampus_{n}.nii.gz"),
            "label": str(MINI / "labelsTr" / f"hippocampus_{n}.nii.gz"),
        }
        for n in ("001", "003")
    ]
    trainer, _, _ = train(
        tmp_path / "train",
        epochs=1,
        val_interval=1,
        **{"train#dataset#data": entries, "validate#dataset#data": entries},
    )
    assert trainer.state.iteration == 1
    (tmp_path / "plain.json").write_text(json.dumps(entries))
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "evaluate.json"),
        workflow_type="infer",
        datalist=str(tmp_path / "plain.json"),
        output_dir=str(tmp_path / "eval"),
        network_name="sam_med3d_tiny",
        ckpt_path=str(tmp_path / "train" / "model_latest.pt"),
        num_clicks=2,
        **{"network_def#image_size": 64, "report#progress": False},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["overall"]["targets"] == 4  # two cases, two classes each, found in the labels


def test_an_empty_label_is_named(tmp_path):
    from custom.cases import CaseError
    from custom.transforms import LabelClassesd

    empty = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4))
    nib.save(empty, tmp_path / "empty.nii.gz")
    from monai.transforms import LoadImaged

    item = LoadImaged("label", image_only=True, ensure_channel_first=True)({"label": str(tmp_path / "empty.nii.gz")})
    with pytest.raises(CaseError, match="empty.nii.gz: the label has no class"):
        LabelClassesd("label")(item)


def _split_by_train_json(datalist, **overrides):
    """train.json's training and validation entries for ``datalist``, as the bundle builds them."""
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), workflow_type="train", datalist=datalist, **overrides
    )
    workflow.initialize()
    return [Path(e["image"]).name for e in workflow.parser.get_parsed_content("train_entries")], [
        Path(e["image"]).name for e in workflow.parser.get_parsed_content("val_entries")
    ]


def test_a_datalist_without_validation_holds_out_a_seeded_share(tmp_path, capsys):
    content = json.loads((MINI / "dataset.json").read_text())
    every = [
        {key: str((MINI / entry[key]).resolve()) for key in ("image", "label")}
        for entry in content["training"] + content["validation"]
    ]
    names = [Path(entry["image"]).name for entry in every]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(every))  # as MONAI Label passes data: a list of {image, label}
    msd = tmp_path / "dataset.json"
    msd.write_text(json.dumps({"modality": {"0": "MRI"}, "training": every}))  # an MSD file without 'validation'
    for datalist in (plain, msd):
        capsys.readouterr()
        train_names, val_names = _split_by_train_json(str(datalist))
        log = capsys.readouterr().out  # the bundle's logging.conf logs to stdout
        assert len(val_names) == 1 and len(train_names) == 5  # round(0.2 * 6)
        assert sorted(train_names + val_names) == sorted(names)
        assert f"holding out 1 of 6 cases for validation (val_fraction 0.2, seed 0): {val_names[0][:-7]}" in log
        assert _split_by_train_json(str(datalist)) == (train_names, val_names)  # seeded: the same again
    held = {tuple(_split_by_train_json(str(plain), seed=seed, val_fraction=0.5)[1]) for seed in range(4)}
    assert all(len(val) == 3 for val in held) and len(held) > 1  # the seed draws them
    # a datalist with a validation list is used as it is, without a word
    capsys.readouterr()
    train_names, val_names = _split_by_train_json(str(MINI / "dataset.json"))
    assert val_names == ["hippocampus_322.nii.gz", "hippocampus_325.nii.gz"] and len(train_names) == 4
    assert "holding out" not in capsys.readouterr().out
    # a single case cannot be split: validated on itself, with a warning
    plain.write_text(json.dumps(every[:1]))
    assert _split_by_train_json(str(plain)) == (names[:1], names[:1])
    assert "validation runs on the training cases" in capsys.readouterr().out


def test_a_run_shorter_than_val_interval_ends_with_a_model(tmp_path, capsys):
    train(tmp_path, epochs=1, val_interval=5)  # no validation runs
    final = torch.load(tmp_path / "model.pt", weights_only=True)
    latest = torch.load(tmp_path / "model_latest.pt", weights_only=True)
    assert final.keys() == latest.keys()
    assert all(torch.equal(final["model"][k], latest["model"][k]) for k in latest["model"])
    model = build_sam_med3d("sam_med3d_tiny", image_size=64)
    assert load_weights(model, tmp_path / "model.pt").ok
    summary = json.loads((tmp_path / "model.json").read_text())
    assert summary["key_metric"] is None and summary["best_metric"] is None and "no validation ran" in summary["note"]
    assert f"{tmp_path / 'model.pt'} holds the final weights" in capsys.readouterr().out
