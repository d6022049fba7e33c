"""Automatic segmentation with the SAM-Med3D encoder as UNETR backbone: encoder transfer, shapes, whole-volume
inference on the original grid, per-class evaluation, training through the bundle, clear errors."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import CONFIGS, REPO_ROOT, randomize_
from monai.bundle import ConfigWorkflow
from monai.losses import DiceCELoss

from custom.data import CaseList
from custom.networks import build_autoseg, build_sam_med3d, checkpoint_payload, load_weights, with_weights
from custom.networks.autoseg import default_skip_blocks
from custom.networks.checkpoint import save_atomic

SAMPLE = REPO_ROOT / "bundle" / "sample"
# patch 8 like the shipped lite model, 3 blocks: 3 upsampling stages, skips from blocks 0 and 1
LITE = dict(
    image_size=32, encoder_embed_dim=32, encoder_depth=3, encoder_num_heads=2, prompt_embed_dim=48, decoder_mlp_dim=64
)
# patch 16 with windowed blocks like the released model: 4 stages, 3 skips; the textbook bias, since the
# test feeds it a non-cubic patch (the upstream bias exists for cubic grids only)
TINY16 = dict(
    image_size=32,
    encoder_embed_dim=48,
    encoder_depth=4,
    encoder_num_heads=3,
    prompt_embed_dim=48,
    rel_pos_bias="decomposed",
)
NET_OVERRIDES = {f"network_def#{k}": v for k, v in LITE.items()} | {"network_name": "sam_med3d_lite", "feature_size": 4}


def small_net(out_channels: int = 3, **overrides) -> torch.nn.Module:
    return build_autoseg("sam_med3d_lite", out_channels=out_channels, feature_size=4, **dict(LITE, **overrides))


def sam_checkpoint(path, wrap=lambda state: {"model": state, "rel_pos_bias": "decomposed"}, **overrides):
    sam = randomize_(build_sam_med3d("sam_med3d_lite", **dict(LITE, **overrides)), seed=3)
    save_atomic(wrap({k: v.half() for k, v in sam.state_dict().items()}), path)
    return sam.state_dict()


@pytest.mark.parametrize(
    "wrap, bias",
    [
        pytest.param(lambda s: {"model": s, "rel_pos_bias": "decomposed"}, "decomposed", id="bundle"),
        pytest.param(  # upstream training file: wrapped, DDP prefix, other entries; upstream bias
            lambda s: {"model_state_dict": {f"module.{k}": v for k, v in s.items()}, "epoch": torch.tensor(3)},
            "upstream",
            id="upstream",
        ),
    ],
)
def test_encoder_keys_land_in_the_backbone_and_the_rest_are_reported(tmp_path, wrap, bias):
    state = sam_checkpoint(tmp_path / "sam.pt", wrap, rel_pos_bias=bias)
    net = small_net(3, rel_pos_bias=bias)
    decoder_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("image_encoder.")}
    report = load_weights(net, tmp_path / "sam.pt", start=True)
    encoder_keys = {k for k in state if k.startswith("image_encoder.")}
    assert set(report.loaded) == encoder_keys and not report.missing and not report.shape_mismatches
    assert set(report.unexpected) == set(state) - encoder_keys
    assert {k.split(".")[0] for k in report.unexpected} == {"prompt_encoder", "mask_decoder"}
    after = net.state_dict()
    for key in encoder_keys:  # the file holds fp16: the backbone gets exactly those values
        torch.testing.assert_close(after[key], state[key].half().float(), rtol=0, atol=0)
    for key, value in decoder_before.items():
        assert torch.equal(after[key], value), key


def test_encoder_loading_errors_name_the_problem(tmp_path):
    net = small_net(3)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_weights(net, tmp_path / "nowhere.pt", start=True)
    save_atomic({"model": {"mask_decoder.w": torch.zeros(2)}}, tmp_path / "decoder_only.pt")
    with pytest.raises(ValueError, match=r"decoder_only.pt.*no 'image_encoder\.\*' key"):
        load_weights(net, tmp_path / "decoder_only.pt", start=True)
    sam_checkpoint(tmp_path / "wide.pt", encoder_embed_dim=64, encoder_num_heads=4)
    mismatch = r"shape mismatch: image_encoder\.pos_embed \(file \(1, 4, 4, 4, 64\), model \(1, 4, 4, 4, 32\)\)"
    with pytest.raises(ValueError, match=mismatch):
        load_weights(net, tmp_path / "wide.pt", start=True)
    deeper = small_net(3, encoder_depth=4)
    sam_checkpoint(tmp_path / "sam.pt")
    with pytest.raises(ValueError, match=r"missing from the file: image_encoder\.blocks\.3\."):
        load_weights(deeper, tmp_path / "sam.pt", start=True)


def test_autoseg_checkpoint_with_other_class_count_is_refused(tmp_path):
    trained = small_net(8)
    save_atomic(checkpoint_payload(trained), tmp_path / "autoseg.pt")
    with pytest.raises(ValueError, match=r"predicts 8 classes .* out_channels=3"):
        with_weights(small_net(3), tmp_path / "autoseg.pt")
    with pytest.raises(FileNotFoundError, match="train_autoseg.json"):
        with_weights(trained, tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="out_channels must be an integer >= 2"):
        build_autoseg("sam_med3d_lite", out_channels=1, **LITE)
    loaded = with_weights(small_net(8), tmp_path / "autoseg.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
    # no file: a starting point may be the initialisation (training from scratch), a network to run may not
    fresh = small_net(8)
    assert with_weights(fresh, None, start=True) is fresh and with_weights(fresh, "", start=True) is fresh
    with pytest.raises(ValueError, match="no weights file given"):
        with_weights(fresh, None)


def test_default_skip_blocks_are_evenly_spaced():
    assert default_skip_blocks(12, 3) == (2, 5, 8)  # UNETR's z3, z6, z9
    assert default_skip_blocks(6, 2) == (1, 3)  # the shipped lite variant
    with pytest.raises(ValueError, match="skip_blocks must be 2 increasing"):
        build_autoseg("sam_med3d_lite", out_channels=3, skip_blocks=(1,), **LITE)


@pytest.mark.parametrize(
    "name, overrides, shape",
    [("sam_med3d_lite", LITE, (32, 48, 40)), ("sam_med3d_tiny", TINY16, (32, 32, 64))],
    ids=["patch8", "patch16"],
)
def test_output_has_n_channels_and_the_input_shape(name, overrides, shape):
    torch.manual_seed(0)
    net = build_autoseg(name, out_channels=5, feature_size=4, **overrides).eval()
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        y = net(x)
        skips, bottleneck = net.encoder_features(x)
        # independently: the encoder's own forward and its blocks run one by one
        torch.testing.assert_close(bottleneck, net.image_encoder(x))
        tokens, expected = net.image_encoder.embed_tokens(x), []
        for i, block in enumerate(net.image_encoder.blocks):
            tokens = block(tokens)
            expected += [tokens.permute(0, 4, 1, 2, 3)] if i in net.skip_blocks else []
    assert y.shape == (2, 5, *shape) and torch.isfinite(y).all()
    assert len(skips) == round(np.log2(net.image_encoder.patch_size)) - 1
    for got, want in zip(skips, expected):
        torch.testing.assert_close(got, want)


def test_short_training_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    net = small_net(3)
    image = torch.randn(2, 1, 32, 32, 32)
    label = torch.zeros(2, 1, 32, 32, 32)
    label[:, :, 8:20, 8:20, 8:20] = 1
    label[:, :, 22:30, 4:12, 20:28] = 2
    image = image + 2 * label  # learnable: the classes are brighter
    loss_fn, optimizer = DiceCELoss(to_onehot_y=True, softmax=True), torch.optim.AdamW(net.parameters(), 3e-3)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = loss_fn(net(image), label)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_training_through_the_bundle_initialises_the_encoder_and_writes_checkpoints(tmp_path):
    state = sam_checkpoint(tmp_path / "sam.pt")
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train_autoseg.json"),
        workflow_type="train",
        datalist=str(SAMPLE / "hippocampus_mini" / "dataset.json"),
        output_dir=str(tmp_path / "run"),
        pretrained_ckpt=str(tmp_path / "sam.pt"),
        out_channels=3,
        spacing_mm=[1.5, 1.5, 1.5],
        epochs=1,
        iterations_per_epoch=2,
        val_interval=1,
        val_num_cases=1,
        sw_batch_size=4,
        **NET_OVERRIDES,
    )
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network")
    torch.testing.assert_close(  # loaded before training started (the file holds fp16)
        network.image_encoder.pos_embed.detach(), state["image_encoder.pos_embed"].half().float(), rtol=0, atol=0
    )
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    workflow.finalize()
    assert trainer.state.iteration == 2 and np.isfinite(float(trainer.state.output[0]["loss"]))
    run = tmp_path / "run"
    summary = json.loads((run / "model.json").read_text())
    assert summary["key_metric"] == "val_mean_dice" and 0.0 <= summary["best_metric"] <= 1.0
    for name in ("model.pt", "model_latest.pt"):
        net = small_net(3)
        with_weights(net, run / name)  # strict: every key, same shapes
    with pytest.raises(ValueError, match="holds no cases"):
        empty = tmp_path / "empty.json"
        empty.write_text("[]")
        CaseList.images(datalist=empty)


def test_whole_volume_inference_and_evaluation_on_the_original_grid(tmp_path):
    torch.manual_seed(1)
    trained = small_net(8)
    half = {k: v.half() for k, v in trained.state_dict().items()}
    save_atomic({"model": half, "rel_pos_bias": "decomposed"}, tmp_path / "autoseg.pt")
    common = dict(ckpt_path=str(tmp_path / "autoseg.pt"), spacing_mm=[5.0, 5.0, 5.0], sw_batch_size=8, **NET_OVERRIDES)
    infer = ConfigWorkflow(
        config_file=str(CONFIGS / "inference_autoseg.json"),
        workflow_type="infer",
        output_dir=str(tmp_path / "seg"),
        **common,
    )
    infer.initialize()
    infer.run()
    infer.finalize()
    image = nib.load(SAMPLE / "images" / "openkbp_pt_243.nii.gz")
    saved = nib.load(tmp_path / "seg" / "openkbp_pt_243" / "openkbp_pt_243_autoseg.nii.gz")
    assert saved.shape == image.shape
    np.testing.assert_allclose(saved.affine, image.affine, atol=1e-4)
    prediction = np.asarray(saved.dataobj)
    assert prediction.min() >= 0 and prediction.max() <= 7 and len(np.unique(prediction)) > 1

    evaluate = ConfigWorkflow(
        config_file=[str(CONFIGS / "inference_autoseg.json"), str(CONFIGS / "evaluate_autoseg.json")],
        workflow_type="infer",
        output_dir=str(tmp_path / "eval"),
        **common,
    )
    evaluate.initialize()
    evaluate.run()
    evaluate.finalize()
    with open(tmp_path / "eval" / "mean_dice_raw.csv") as handle:
        row = next(csv.DictReader(handle))
    truth = np.asarray(nib.load(SAMPLE / "labels" / "openkbp_pt_243.nii.gz").dataobj)
    for label in range(1, 8):  # class{k} of MONAI's CSV is label k + 1 (background excluded)
        pred_mask, true_mask = prediction == label, truth == label
        if not true_mask.any():
            assert row[f"class{label - 1}"] == "nan"
            continue
        dice = 2 * (pred_mask & true_mask).sum() / (pred_mask.sum() + true_mask.sum())
        assert float(row[f"class{label - 1}"]) == pytest.approx(dice, abs=1e-5), label
    assert (tmp_path / "eval" / "mean_dice_summary.csv").is_file()


def test_case_list_takes_the_dataset_modality_and_reports_missing_files(tmp_path):
    image = SAMPLE / "images" / "openkbp_pt_243.nii.gz"
    dataset = {
        "modality": {"0": "CT"},
        "validation": [
            {"image": str(image), "label": str(SAMPLE / "labels" / "openkbp_pt_243.nii.gz")},
            {"image": str(image)},
            {"image": "missing.nii.gz", "label": "missing_label.nii.gz"},
        ],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    cases = CaseList.images(datalist=tmp_path / "dataset.json", data_list_key="validation", require_label=True)
    assert [c["modality"] for c in cases.cases] == ["CT"]  # chooses the CT clamp, as in training
    assert len(cases.failures) == 2 and "no 'label' entry" in cases.failures[0]
    assert "missing.nii.gz" in cases.failures[1] and "missing_label.nii.gz" in cases.failures[1]
    with pytest.raises(RuntimeError, match="2 case\\(s\\) failed"):
        cases.raise_if_failed()
    first = CaseList.images(datalist=tmp_path / "dataset.json", data_list_key="validation", max_cases=1)
    assert len(first.cases) == 1 and not first.failures and "label" in first.cases[0]
