"""The evaluation workflow: metrics against independent computations, click protocols, summaries, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import ThresholdNetwork, evaluate, two_blob_volumes, write_msd_dataset, write_nifti
from monai.transforms import Compose, EnsureChannelFirst, Invert, LoadImage, Orientation, Orientationd, Spacing
from scipy import ndimage

from custom.evaluation import dice_and_nsd
from custom.prompts import inner_core_click, simulated_click
from custom.reports import summarize
from custom.spacing import AxisAlignedSpacingd, NetworkGrid


class EmptyNetwork(ThresholdNetwork):
    def decode(self, embedding, point_coords, point_labels, mask_input=None):
        return torch.full_like(embedding, -10.0), embedding.new_zeros(embedding.shape[0], 1)


def test_oracle_scores_one_from_the_first_click(tmp_path):
    summary, rows = evaluate(tmp_path, write_msd_dataset(tmp_path / "data", two_blob_volumes()), ThresholdNetwork())
    assert len(rows) == 2 * 3 and all(float(r["dice"]) == 1.0 and float(r["nsd"]) == 1.0 for r in rows)
    overall = summary["overall"]
    assert overall["dice@1"] == overall["dice@3"] == 1.0 and overall["NoC@90"] == 1.0
    assert (tmp_path / "eval" / "dice_vs_clicks.png").stat().st_size > 1000


def test_empty_prediction_scores_zero_and_needs_every_click(tmp_path):
    summary, rows = evaluate(
        tmp_path, write_msd_dataset(tmp_path / "data", two_blob_volumes()), EmptyNetwork(), num_clicks=4
    )
    assert all(float(r["dice"]) == 0.0 for r in rows)
    assert summary["overall"]["dice@1"] == 0.0 and summary["overall"]["NoC@80"] == 4.0
    assert "dice@10" not in summary["overall"]


def test_a_failed_case_is_reported_and_the_rest_evaluated(tmp_path):
    dataset = write_msd_dataset(tmp_path / "data", two_blob_volumes())
    (dataset / "imagesTr" / "case0.nii.gz").unlink()
    with pytest.raises(RuntimeError):
        evaluate(tmp_path, dataset, ThresholdNetwork())
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["overall"]["targets"] == 1 and "case0" in summary["failed_cases"][0]


def _independent_nsd(pred, truth, spacing, tolerance):
    def surface(mask):
        return mask & ~ndimage.binary_erosion(mask)

    sp, st = surface(pred), surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return ((to_truth[sp] <= tolerance).sum() + (to_pred[st] <= tolerance).sum()) / (sp.sum() + st.sum())


def test_dice_and_nsd_against_an_independent_computation():
    truth = np.zeros((30, 30, 20), bool)
    truth[5:20, 8:22, 4:14] = True
    pred = np.zeros_like(truth)
    pred[7:23, 8:20, 5:16] = True
    spacing = (0.8, 1.1, 2.5)
    for tolerance in (1.0, 2.0):
        dice, nsd = dice_and_nsd(torch.as_tensor(pred), torch.as_tensor(truth), spacing, tolerance)
        assert dice == pytest.approx(2 * (pred & truth).sum() / (pred.sum() + truth.sum()), abs=1e-6)
        assert nsd == pytest.approx(_independent_nsd(pred, truth, spacing, tolerance), abs=1e-6)
        assert 0.05 < nsd < 0.95  # the tolerance matters here: a real check
    assert dice_and_nsd(
        torch.zeros(5, 5, 5, dtype=torch.bool), torch.ones(5, 5, 5, dtype=torch.bool), spacing, 1.0
    ) == (0.0, 0.0)


def test_protocols_are_seeded_and_differ_where_they_should():
    target = torch.zeros(30, 30, 30, dtype=torch.bool)
    target[3:27, 3:27, 3:27] = True
    empty = torch.zeros_like(target)
    for protocol in ("uniform", "paper"):
        first = [simulated_click(protocol, empty, target, 1, torch.Generator().manual_seed(s))[0] for s in range(3)]
        again = [simulated_click(protocol, empty, target, 1, torch.Generator().manual_seed(s))[0] for s in range(3)]
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    # depth of a voxel in the 24^3 cube: the paper's first clicks stay in the inner core (depth > 6)
    depth = ndimage.distance_transform_edt(np.pad(target.numpy(), 1))[1:-1, 1:-1, 1:-1]
    uniform = [simulated_click("uniform", empty, target, 1, torch.Generator().manual_seed(s))[0] for s in range(200)]
    paper = [simulated_click("paper", empty, target, 1, torch.Generator().manual_seed(s))[0] for s in range(200)]
    assert all(depth[tuple(p.long())] > 6 for p in paper)
    assert sum(depth[tuple(p.long())] <= 6 for p in uniform) > 50
    # from the third click on, the paper protocol is uniform too
    third = [simulated_click("paper", empty, target, 3, torch.Generator().manual_seed(s))[0] for s in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(third, uniform[:5]))
    with pytest.raises(ValueError, match="known"):
        simulated_click("random", empty, target, 1, torch.Generator())


def test_inner_core_picks_the_larger_error_region():
    target = torch.zeros(20, 20, 20, dtype=torch.bool)
    target[2:18, 2:18, 2:18] = True
    prediction = target.clone()
    prediction[2:5, 2:5, 2:5] = False  # a small miss
    prediction[0:2, :, :] = True  # a thin false positive slab
    _, label = inner_core_click(prediction, target, torch.Generator().manual_seed(0))
    assert label == 1  # the 3^3 miss is deeper than the 2-voxel slab
    assert inner_core_click(target, target, torch.Generator()) is None


def test_summary_numbers():
    rows = [{"case": "a", "class": 1, "click": k, "dice": d, "nsd": d / 2} for k, d in zip((1, 2, 3), (0.5, 0.86, 0.7))]
    rows += [{"case": "b", "class": 1, "click": k, "dice": d, "nsd": 0.0} for k, d in zip((1, 2, 3), (0.9, 0.95, 0.96))]
    summary = summarize(rows, num_clicks=3, report_clicks=(1, 3))
    overall = summary["overall"]
    assert overall["dice@1"] == pytest.approx(0.7) and overall["dice@3"] == pytest.approx(0.83)
    assert overall["NoC@85"] == pytest.approx(1.5) and overall["NoC@90"] == pytest.approx(2.0)
    assert overall["best_over_clicks_dice@3"] == pytest.approx((0.86 + 0.96) / 2)


def test_network_grid_paste_back_agrees_with_monai_inversion(tmp_path):
    rng = np.random.default_rng(3)
    volume = ndimage.gaussian_filter(rng.normal(size=(40, 30, 16)), 2) > 0
    affine = np.diag([-0.9, -1.2, 2.5, 1.0])
    affine[:3, 3] = [20.0, -5.0, -10.0]
    path = write_nifti(tmp_path / "g.nii.gz", volume.astype(np.float32), affine)
    load = Compose([LoadImage(image_only=True), EnsureChannelFirst()])
    original = load(path)
    spatial = Compose([Orientation(axcodes="RAS", labels=None), Spacing(pixdim=(1.5, 1.5, 1.5), mode="nearest")])
    resampled = spatial(original)
    grid = NetworkGrid(original.affine, original.shape[1:], resampled.affine, resampled.shape[1:])
    ours = torch.zeros(original.shape[1:], dtype=torch.bool)
    grid.paste(resampled[0] > 0.5, [(0, n) for n in resampled.shape[1:]], ours)
    inverted = Invert(spatial, nearest_interp=True)(resampled)[0].numpy() > 0.5
    assert (ours.numpy() == inverted).mean() > 0.995
    np.testing.assert_allclose(
        grid.stored_to_network(torch.tensor([[10.0, 5.0, 3.0]]))[0].numpy(),
        (np.linalg.inv(np.asarray(resampled.affine)) @ affine @ [10.0, 5.0, 3.0, 1.0])[:3],
        atol=1e-4,
    )
    # the exact resampler's own inverse (what Invertd runs for the automatic workflow) is the same paste-back
    exact = Compose(
        [Orientationd("image", axcodes="RAS", labels=None), AxisAlignedSpacingd("image", (1.5,) * 3, "nearest")]
    )
    forward = exact({"image": original})["image"]
    assert tuple(forward.shape) == tuple(resampled.shape)
    back = torch.zeros(original.shape[1:], dtype=torch.bool)
    NetworkGrid(original.affine, original.shape[1:], forward.affine, forward.shape[1:]).paste(
        forward[0] > 0.5, [(0, n) for n in forward.shape[1:]], back
    )
    inverted = exact.inverse({"image": forward})["image"][0] > 0.5
    assert torch.equal(back, torch.as_tensor(inverted))


def test_the_challenge_protocol_with_other_settings_than_the_challenges_says_so(caplog):
    from custom.evaluation import ClickEvaluationStep
    from custom.predictor import VolumetricPredictor

    with caplog.at_level("WARNING", logger="custom.evaluation"):
        ClickEvaluationStep(VolumetricPredictor, num_clicks=5, protocol="cvpr25", nsd_tolerance_mm=2.0)
        assert not caplog.records
        ClickEvaluationStep(VolumetricPredictor, num_clicks=10, protocol="cvpr25", nsd_tolerance_mm=1.0)
    assert len(caplog.records) == 1 and "evaluate_cvpr25.json" in caplog.records[0].getMessage()
