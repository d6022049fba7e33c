"""Checkpoint files in every accepted format load strictly; wrong ones fail naming the keys."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from helpers import REPO_ROOT, randomize_

from custom.networks import build_sam_med3d, checkpoint_payload, load_weights
from custom.networks.checkpoint import read_checkpoint


@pytest.fixture()
def tiny():
    return randomize_(build_sam_med3d("sam_med3d_tiny"), seed=3)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _upstream_training_file(state: dict) -> dict:
    """What upstream's trainer saves (without its pickled extras, which are tested separately)."""
    return {
        "epoch": 199,
        "model_state_dict": OrderedDict(state),
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 8e-5, "params": [0, 1]}]},
        "lr_scheduler_state_dict": {"milestones": {120: 1, 180: 1}, "last_epoch": 199},
        "losses": [0.9, 0.5],
        "dices": [0.4, 0.7],
        "best_loss": 0.5,
        "best_dice": 0.7,
    }


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda s: {"model_state_dict": OrderedDict(s)}, id="turbo"),
        pytest.param(_upstream_training_file, id="upstream-training-file"),
        pytest.param(lambda s: dict(s), id="bare"),
        pytest.param(lambda s: {"model": dict(s)}, id="bundle"),
        pytest.param(lambda s: {"model": {f"module.{k}": v for k, v in s.items()}}, id="ddp-prefix"),
    ],
)
def test_accepted_formats_load_strictly(tiny, tmp_path, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(tiny.state_dict()), path)
    fresh = build_sam_med3d("sam_med3d_tiny")
    report = load_weights(fresh, path)
    assert report.ok and len(report.loaded) == len(tiny.state_dict())
    _assert_same_weights(fresh, tiny)


def test_released_configuration_turbo_file(tmp_path):
    """The released layout, 324 tensors, in the turbo file's exact wrapper."""
    model = build_sam_med3d("sam_med3d")
    path = tmp_path / "sam_med3d_turbo.pth"
    torch.save({"model_state_dict": OrderedDict(model.state_dict())}, path)
    fresh = build_sam_med3d("sam_med3d")
    report = load_weights(fresh, path)
    assert len(report.loaded) == 324
    # the Gaussian PE matrix is a buffer in the file: it must be taken, never re-drawn
    key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    assert torch.equal(fresh.state_dict()[key], model.state_dict()[key])


def test_pickled_legacy_file_needs_opt_in(tiny, tmp_path):
    path = tmp_path / "sam_med3d_organ.pth"
    torch.save({"model_state_dict": tiny.state_dict(), "args": argparse.Namespace(lr=8e-4)}, path)
    with pytest.raises(ValueError, match="allow_pickle=True") as err:
        load_weights(build_sam_med3d("sam_med3d_tiny"), path)
    assert "convert_checkpoint.py" in str(err.value) and str(path) in str(err.value)
    fresh = build_sam_med3d("sam_med3d_tiny")
    load_weights(fresh, path, allow_pickle=True)
    _assert_same_weights(fresh, tiny)


def test_mismatch_names_missing_unexpected_and_shapes(tiny, tmp_path):
    state = dict(tiny.state_dict())
    del state["mask_decoder.iou_token.weight"]
    state["image_encoder.extra.weight"] = torch.zeros(2)
    state["image_encoder.pos_embed"] = torch.zeros(1, 4, 4, 4, 192)
    path = tmp_path / "wrong.pt"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError) as err:
        load_weights(build_sam_med3d("sam_med3d_tiny"), path)
    message = str(err.value)
    assert "1 missing from the file: mask_decoder.iou_token.weight" in message
    assert "1 unexpected in the file: image_encoder.extra.weight" in message
    assert "image_encoder.pos_embed (file (1, 4, 4, 4, 192), model (1, 8, 8, 8, 192))" in message


def test_wrong_variant_fails_and_non_strict_reports(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save({"model": tiny.state_dict()}, path)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_weights(build_sam_med3d("sam_med3d_small"), path)
    small = build_sam_med3d("sam_med3d_small")
    report = load_weights(small, path, strict=False)
    assert "image_encoder.blocks.5.attn.qkv.weight" in report.missing  # tiny has 4 blocks, small 6
    assert "image_encoder.blocks.0.attn.qkv.weight (file (576, 192), model (1152, 384))" in report.shape_mismatches
    assert "prompt_encoder.mask_downscaling.0.weight" in report.loaded  # same shape in both: taken
    assert torch.equal(
        small.state_dict()["prompt_encoder.mask_downscaling.0.weight"],
        tiny.state_dict()["prompt_encoder.mask_downscaling.0.weight"],
    )


def test_missing_file_and_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="blueyo0/SAM-Med3D"):
        read_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        read_checkpoint(tmp_path / "junk.pth")
    torch.save({"epoch": 3, "losses": [1.0]}, tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match="holds no state dict"):
        read_checkpoint(tmp_path / "nostate.pth")


def _convert_command(src, dst, *options: str) -> list[str]:
    """``bundle/scripts/convert_checkpoint.py`` from ``src`` to ``dst`` with ``options``, as a command line."""
    script = str(REPO_ROOT / "bundle/scripts/convert_checkpoint.py")
    return [sys.executable, script, "--src", str(src), "--dst", str(dst), *options]


def test_convert_script_writes_weights_only_file(tiny, tmp_path):
    src = tmp_path / "legacy.pth"
    torch.save({"model_state_dict": tiny.state_dict(), "args": argparse.Namespace(lr=1.0)}, src)
    dst = tmp_path / "out" / "model.pt"
    cmd = _convert_command(src, dst)
    result = subprocess.run(cmd + ["--network_name", "sam_med3d_tiny"], capture_output=True, text=True)
    assert result.returncode != 0 and "allow_pickle" in result.stderr
    assert not dst.exists()
    result = subprocess.run(
        cmd + ["--network_name", "sam_med3d_tiny", "--allow_pickle", "true"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    loaded = torch.load(dst, weights_only=True)
    assert set(loaded) == {"model", "rel_pos_bias", "dense_pe_axis_swap"} and loaded["rel_pos_bias"] == "upstream"
    assert loaded["dense_pe_axis_swap"] is True  # an upstream file: the released weights' swap
    assert [p.name for p in dst.parent.iterdir()] == ["model.pt"]  # no temporary file left behind
    fresh = build_sam_med3d("sam_med3d_tiny")
    load_weights(fresh, dst)
    _assert_same_weights(fresh, tiny)


def test_convert_to_half_precision_loads_into_float32(tiny, tmp_path):
    src = tmp_path / "full.pt"
    torch.save({"model": tiny.state_dict()}, src)
    dst = tmp_path / "half.pt"
    assert (
        subprocess.run(_convert_command(src, dst, "--dtype", "float16"), capture_output=True, text=True).returncode == 0
    )
    assert dst.stat().st_size < 0.6 * src.stat().st_size
    half = torch.load(dst, weights_only=True)["model"]
    assert half["image_encoder.pos_embed"].dtype == torch.float16
    fresh = build_sam_med3d("sam_med3d_tiny")
    load_weights(fresh, dst)
    weight = fresh.state_dict()["image_encoder.blocks.0.attn.qkv.weight"]
    assert weight.dtype == torch.float32
    torch.testing.assert_close(
        weight, tiny.state_dict()["image_encoder.blocks.0.attn.qkv.weight"], rtol=1e-3, atol=1e-4
    )


def test_files_record_their_bias_and_a_mismatch_is_refused(tmp_path):
    lite = randomize_(build_sam_med3d("sam_med3d_lite", encoder_depth=1), seed=5)
    written = tmp_path / "lite.pt"
    torch.save(checkpoint_payload(lite), written)
    assert torch.load(written, weights_only=True)["rel_pos_bias"] == "decomposed"
    assert load_weights(build_sam_med3d("sam_med3d_lite", encoder_depth=1), written).ok
    # the same weights in a network with the other bias: the keys fit, the attention would not
    other = build_sam_med3d("sam_med3d_lite", encoder_depth=1, rel_pos_bias="upstream")
    with pytest.raises(ValueError, match=r"records rel_pos_bias='decomposed'.*uses rel_pos_bias='upstream'"):
        load_weights(other, written)
    # a file that records nothing is an upstream file: refused by a decomposed network, with the way out
    bare = tmp_path / "bare.pt"
    torch.save({"model": lite.state_dict()}, bare)
    with pytest.raises(ValueError, match=r"records no rel_pos_bias.*--rel_pos_bias decomposed"):
        load_weights(build_sam_med3d("sam_med3d_lite", encoder_depth=1), bare)
    assert load_weights(other, bare).ok


def test_convert_declares_an_old_lite_file(tmp_path):
    lite = randomize_(build_sam_med3d("sam_med3d_lite"), seed=6)
    old = tmp_path / "old.pt"
    torch.save({"model": lite.state_dict()}, old)  # as the bundle wrote them before the record existed
    script = [sys.executable, str(REPO_ROOT / "bundle/scripts/convert_checkpoint.py"), "--src", str(old)]
    refused = subprocess.run(
        script + ["--dst", str(tmp_path / "x.pt"), "--network_name", "sam_med3d_lite"], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "records no rel_pos_bias" in refused.stderr
    assert not (tmp_path / "x.pt").exists()
    declared = tmp_path / "new.pt"
    result = subprocess.run(
        script + ["--dst", str(declared), "--network_name", "sam_med3d_lite", "--rel_pos_bias", "decomposed"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    fresh = build_sam_med3d("sam_med3d_lite")
    assert load_weights(fresh, declared).ok
    _assert_same_weights(fresh, lite)


def test_files_record_the_axis_swap_and_a_mismatch_is_refused(tmp_path):
    swapped = randomize_(build_sam_med3d("sam_med3d_lite", encoder_depth=1), seed=7)
    written = tmp_path / "swapped.pt"
    torch.save(checkpoint_payload(swapped), written)
    assert torch.load(written, weights_only=True)["dense_pe_axis_swap"] is True
    unswapped = build_sam_med3d("sam_med3d_lite", encoder_depth=1, dense_pe_axis_swap=False)
    with pytest.raises(ValueError, match=r"dense_pe_axis_swap=True, but the network uses dense_pe_axis_swap=False"):
        load_weights(unswapped, written)
    assert load_weights(build_sam_med3d("sam_med3d_lite", encoder_depth=1), written).ok


def _bundle_with_bare_model(root, network, **conventions):
    (root / "models").mkdir(parents=True)
    (root / "configs").mkdir()
    torch.save(network.state_dict(), root / "models" / "model.pt")
    (root / "configs" / "metadata.json").write_text(json.dumps({"network_name": "x", **conventions}))
    return root / "models" / "model.pt"


def test_a_bare_bundle_model_is_checked_against_the_conventions_in_its_metadata(tmp_path):
    trained = randomize_(build_sam_med3d("sam_med3d_lite", encoder_depth=1, dense_pe_axis_swap=False), seed=8)
    right = _bundle_with_bare_model(tmp_path / "a", trained, rel_pos_bias="decomposed", dense_pe_axis_swap=False)
    fresh = build_sam_med3d("sam_med3d_lite", encoder_depth=1, dense_pe_axis_swap=False)
    assert load_weights(fresh, right).ok
    _assert_same_weights(fresh, trained)
    # metadata.json that says the weights were trained with the swap: refused, naming the metadata file
    wrong = _bundle_with_bare_model(tmp_path / "b", trained, rel_pos_bias="decomposed", dense_pe_axis_swap=True)
    with pytest.raises(ValueError, match=r"b/configs/metadata\.json' records dense_pe_axis_swap=True"):
        load_weights(build_sam_med3d("sam_med3d_lite", encoder_depth=1, dense_pe_axis_swap=False), wrong)
    with pytest.raises(ValueError, match=r"rel_pos_bias='upstream' \(in '.*b/configs/metadata\.json'\)"):
        (tmp_path / "b" / "configs" / "metadata.json").write_text(json.dumps({"rel_pos_bias": "upstream"}))
        load_weights(build_sam_med3d("sam_med3d_lite", encoder_depth=1), wrong)
    # the same bare file outside a bundle records nothing: an upstream file, refused by this variant
    outside = tmp_path / "outside.pt"
    torch.save(trained.state_dict(), outside)
    with pytest.raises(ValueError, match="records no rel_pos_bias"):
        load_weights(build_sam_med3d("sam_med3d_lite", encoder_depth=1, dense_pe_axis_swap=False), outside)


def test_convert_writes_a_bare_model_and_prints_its_conventions(tmp_path):
    trained = randomize_(build_sam_med3d("sam_med3d_lite_fullres_clickmaps"), seed=9)
    src = tmp_path / "trained.pt"
    torch.save(checkpoint_payload(trained), src)
    dst = tmp_path / "bundle" / "models" / "model.pt"
    dst.parent.mkdir(parents=True)
    options = ["--network_name", "sam_med3d_lite_fullres_clickmaps", "--dtype", "float16", "--bare", "True"]
    result = subprocess.run(_convert_command(src, dst, *options), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "'rel_pos_bias': 'decomposed', 'dense_pe_axis_swap': False" in result.stdout
    stored = torch.load(dst, weights_only=True)
    assert set(stored) == set(trained.state_dict())  # bare: the model zoo's format
    (tmp_path / "bundle" / "configs").mkdir()
    (tmp_path / "bundle" / "configs" / "metadata.json").write_text(
        json.dumps({"rel_pos_bias": "decomposed", "dense_pe_axis_swap": False})
    )
    assert load_weights(build_sam_med3d("sam_med3d_lite_fullres_clickmaps"), dst).ok
