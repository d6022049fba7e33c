"""Box prompts everywhere a click goes, and the CVPR 2025 challenge's protocol (box, then corrective clicks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import CONFIGS, ThresholdNetwork, randomize_, read_output, run_inference, write_nifti
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from scipy import ndimage

from custom.cases import box_from_challenge
from custom.data import CaseList
from custom.engines import InteractiveSegmentation
from custom.io import read_npz_case
from custom.networks import build_sam_med3d
from custom.predictor import VolumetricPredictor
from custom.prompts import axial_axis, challenge_box, largest_error_click
from custom.reports import cvpr25_summary


def test_the_click_is_at_the_centre_of_the_largest_error_component():
    truth = torch.zeros(24, 24, 24, dtype=torch.bool)
    truth[2:5, 2:14, 10:13] = True  # an L of 3-voxel bars: the larger error component
    truth[2:14, 2:5, 10:13] = True
    truth[20:22, 20:22, 20:22] = True  # a smaller one, ignored
    prediction = torch.zeros_like(truth)
    picks = set()
    for seed in range(20):
        point, label = largest_error_click(prediction, truth, torch.Generator().manual_seed(seed))
        assert label == 1 and point[2] == 11  # on the bars' centre plane
        assert point[0] == 3 or point[1] == 3  # on a centre line of one bar: the depth-2 voxels
        distance = ndimage.distance_transform_edt(np.pad(truth.numpy()[0:17, 0:17, 7:16], 0))
        assert distance[tuple(int(c) - o for c, o in zip(point.tolist(), (0, 0, 7)))] == 2.0
        picks.add(tuple(point.tolist()))
    assert len(picks) > 3  # ties broken by the seeded choice
    again = largest_error_click(prediction, truth, torch.Generator().manual_seed(3))[0]
    assert torch.equal(again, largest_error_click(prediction, truth, torch.Generator().manual_seed(3))[0])
    # a false positive: a negative click
    prediction = truth.clone()
    prediction[15:20, 15:20, 15:20] = True
    point, label = largest_error_click(prediction, truth, torch.Generator())
    assert label == 0 and torch.equal(point, torch.tensor([17.0, 17.0, 17.0]))
    assert largest_error_click(truth, truth, torch.Generator()) is None


def _rows(case, dice_per_step, nsd=0.9, classes=(1,)):
    return [
        {"case": case, "class": c, "click": k, "dice": d, "nsd": nsd, "seconds": 0.1, "case_seconds": 3.0}
        for k, d in enumerate(dice_per_step)
        for c in classes
    ]


def test_auc_and_the_nsd_gate_against_hand_computed_values():
    summary = cvpr25_summary(_rows("a", [0.5, 0.2, 0.4, 0.6, 0.8, 1.0]), num_clicks=5)
    case = summary["cases"][0]
    assert case["DSC_AUC"] == pytest.approx(0.1 + 0.4 + 0.6 + 0.8 + 0.5)  # trapezoid over x = 0..4: 2.4
    assert case["DSC_Final"] == 1.0 and case["DSC_box"] == 0.5
    # NSD counts only where the case's mean DSC > 0.2: the first click step (DSC 0.2) scores 0
    assert case["NSD_AUC"] == pytest.approx(0.0 / 2 + 0.9 + 0.9 + 0.9 + 0.9 / 2)
    assert case["budget_seconds"] == 90.0 and summary["overall"]["within_time_budget"] == 1
    low = cvpr25_summary(_rows("b", [0.1] * 6), num_clicks=5)
    assert low["cases"][0]["NSD_AUC"] == 0.0 and low["cases"][0]["NSD_Final"] == 0.0


def test_box_forms_parse_and_land_on_the_right_voxels(tmp_path):
    box = challenge_box(torch.zeros(10, 12, 14, dtype=torch.bool).index_fill_(0, torch.tensor([3, 4, 5]), True))
    assert box["z_min"] == 3 and box["z_max"] == 5 and box["z_mid"] == 4
    assert box_from_challenge(box) == ([3.0, 0.0, 0.0], [5.0, 11.0, 13.0])
    with pytest.raises(ValueError, match="lacks"):
        box_from_challenge({"z_min": 1})
    # a (x, y, z) array whose axial axis is the last: the 2D box lies on its middle slice across axis 2
    wedge = torch.zeros(10, 12, 14, dtype=torch.bool)
    for k in range(4, 9):
        wedge[2 : 3 + k, 5:7, k] = True  # widest on the last slice, the middle slice (6) spans x 2..8
    axial = challenge_box(wedge, axial_axis=2)
    assert (axial["z_min"], axial["z_mid"], axial["z_max"]) == (4, 6, 8)
    assert box_from_challenge(axial, axial_axis=2) == ([2.0, 5.0, 4.0], [8.0, 6.0, 8.0])
    assert axial_axis(np.diag([1.0, 1.0, 3.0, 1.0])) == 2 and axial_axis([[0, 0, 2], [0, 1, 0], [-2, 0, 0]]) == 0
    affine = np.diag([-1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = [30.0, -10.0, 5.0]
    path = write_nifti(tmp_path / "b.nii.gz", np.ones((20, 20, 10)), affine)
    world = lambda v: (affine @ np.r_[v, 1.0])[:3].tolist()  # noqa: E731
    entries = [
        {"image": path, "box": {"min": [2, 3, 1], "max": [8, 9, 4]}},
        {"image": path, "box_world": {"min": world([8, 3, 1]), "max": world([2, 9, 4])}},
        {
            "image": path,
            "box_2d": {
                "z_min": 2,
                "z_max": 8,
                "z_mid": 5,
                "z_mid_x_min": 1,
                "z_mid_y_min": 3,
                "z_mid_x_max": 4,
                "z_mid_y_max": 9,
            },
        },
    ]
    from custom.transforms import ClicksToVoxelsd

    for entry in entries:
        case = CaseList.prompted(input_dict=entry).cases[0]
        image = MetaTensor(torch.ones(1, 20, 20, 10), affine=torch.as_tensor(affine))
        out = ClicksToVoxelsd()({**case, "image": image})
        np.testing.assert_allclose(out["objects"].objects[0].box, [[2, 3, 1], [8, 9, 4]], atol=1e-6)
    bad = CaseList.prompted(input_dict={"image": path, "box": {"min": [5, 5, 5], "max": [1, 1, 1]}})
    assert "is not a box" in bad.failures[0]


def test_a_box_through_inference_segments_the_object(tmp_path):
    image = np.full((20, 22, 18), 10.0)
    image[5:15, 6:16, 4:14] = 100.0
    path = write_nifti(tmp_path / "box.nii.gz", image, np.diag([1.5, 1.5, 1.5, 1.0]))
    out = run_inference(
        tmp_path, ThresholdNetwork(), input_dict={"image": path, "box": {"min": [5, 6, 4], "max": [14, 15, 13]}}
    )
    mask, _, report = read_output(out, "box")
    np.testing.assert_array_equal(mask > 0, image > 50)
    assert (
        report["objects"][0]["boxes"] == 1 and "box_given_as" in report["objects"][0]
    )  # ThresholdNetwork: no box embeddings


def test_a_box_trained_variant_uses_the_box_while_the_released_kind_gets_the_centre_click():
    image = MetaTensor(torch.randn(1, 40, 40, 40), affine=torch.diag(torch.tensor([1.5, 1.5, 1.5, 1.0])))
    box = ([10, 12, 8], [25, 28, 30])
    centre = [17.5, 20.0, 19.0]
    settings = dict(image_size=32, encoder_depth=2, encoder_global_attn_indexes=(1,), window_size=6)
    boxed = randomize_(build_sam_med3d("sam_med3d_tiny", box_prompts=True, **settings), seed=1).eval()
    plain = randomize_(build_sam_med3d("sam_med3d_tiny", **settings), seed=1).eval()
    masks = {}
    for name, network in (("boxed", boxed), ("plain", plain)):
        for kind in ("box", "click"):
            predictor = VolumetricPredictor(network, roi_size=32, intensity_normalization=None)
            predictor.set_image(image)
            if kind == "box":
                masks[name, kind] = predictor.add_box("o", *box).clone()
                assert ("box_given_as" in predictor.report("o")) == (name == "plain")
            else:
                masks[name, kind] = predictor.add_click("o", centre, positive=True).clone()
    assert torch.equal(masks["plain", "box"], masks["plain", "click"])  # the released kind: the centre click
    assert not torch.equal(masks["boxed", "box"], masks["boxed", "click"])  # the box path is used
    with pytest.raises(ValueError, match="no box embeddings"):
        with torch.no_grad():
            embedding = plain.encode(torch.zeros(1, 1, 32, 32, 32))
            plain.decode(embedding, torch.zeros(1, 2, 3), torch.tensor([[2, 3]]))
    with pytest.raises(ValueError, match="box_prompts=True"):
        InteractiveSegmentation(plain, box_probability=0.5)


def test_training_draws_boxes_for_a_box_variant():
    calls = []
    network = build_sam_med3d(
        "sam_med3d_tiny",
        box_prompts=True,
        image_size=32,
        encoder_depth=2,
        encoder_global_attn_indexes=(1,),
        window_size=6,
    )
    decode = network.decode

    def recording(embedding, coords, labels, mask=None):
        calls.append(None if labels is None else labels.tolist())
        return decode(embedding, coords, labels, mask)

    network.decode = recording
    target = torch.zeros(2, 1, 32, 32, 32)
    target[:, :, 8:20, 10:22, 6:18] = 1
    model = InteractiveSegmentation(network, num_click_steps=3, mask_only_step_range=(2, 2), box_probability=1.0)
    model(torch.randn(2, 1, 32, 32, 32), target, torch.Generator().manual_seed(0))
    assert calls[0] == [[2, 3], [2, 3]] and calls[1] is not None and len(calls[1][0]) == 1


def test_a_challenge_npz_case_runs_end_to_end(tmp_path):
    gts = np.zeros((24, 80, 28), np.uint8)  # two objects further apart than a window, so each is its own
    gts[6:16, 8:20, 6:18] = 1
    gts[14:20, 58:66, 16:24] = 2
    imgs = np.where(gts > 0, 200, 20).astype(np.uint8)
    boxes = np.array([challenge_box(torch.as_tensor(gts == c)) for c in (1, 2)], dtype=object)
    np.savez(tmp_path / "case.npz", imgs=imgs, gts=gts, spacing=np.array([1.5, 1.5, 2.0]), boxes=boxes)
    loaded = read_npz_case(tmp_path / "case.npz")  # spacing (x, y, z) as SimpleITK's, array (z, y, x)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(loaded["image"].affine)[:3, :3], axis=0), [2.0, 1.5, 1.5])
    assert axial_axis(loaded["image"].affine) == 0 and json.loads(loaded["challenge_boxes"])[1]["z_min"] == 14
    (tmp_path / "list.json").write_text(json.dumps({"validation": [{"image": "case.npz"}]}))
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "evaluate.json"), str(CONFIGS / "evaluate_cvpr25.json")],
        workflow_type="infer",
        datalist=str(tmp_path / "list.json"),
        output_dir=str(tmp_path / "eval"),
        network=ThresholdNetwork(),
        **{"predictor#roi_size": 32, "predictor#intensity_normalization": None, "report#progress": False},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    challenge = summary["cvpr25"]
    assert challenge["overall"]["cases"] == 1 and set(challenge["per_class"]) == {"1", "2"}
    assert challenge["overall"]["DSC_box"] > 0.9  # the box's centre click on a thresholding network
    with open(tmp_path / "eval" / "metrics.csv") as handle:
        steps = sorted({int(line.split(",")[2]) for line in handle.readlines()[1:]})
    assert steps == [0, 1, 2, 3, 4, 5] and summary["nsd_tolerance_mm"] == 2.0 and summary["num_clicks"] == 5


def test_a_box_variant_fine_tunes_from_released_kind_weights_and_a_mismatch_names_the_fix(tmp_path):
    from custom.networks import checkpoint_payload, with_weights

    small = {"image_size": 32, "encoder_depth": 2, "encoder_global_attn_indexes": (1,), "window_size": 6}
    released_kind = randomize_(build_sam_med3d("sam_med3d_tiny", **small))
    torch.save(checkpoint_payload(released_kind), tmp_path / "plain.pt")
    boxed = with_weights(
        build_sam_med3d("sam_med3d_tiny", box_prompts=True, **small), tmp_path / "plain.pt", start=True
    )
    torch.testing.assert_close(boxed.image_encoder.state_dict(), released_kind.image_encoder.state_dict())
    torch.save(checkpoint_payload(boxed), tmp_path / "boxed.pt")
    with pytest.raises(ValueError, match="box_prompts True"):
        with_weights(build_sam_med3d("sam_med3d_tiny", **small), tmp_path / "boxed.pt")
    with pytest.raises(ValueError, match="box_corner_embeddings"):
        with_weights(build_sam_med3d("sam_med3d_tiny", box_prompts=True, **small), tmp_path / "plain.pt")


def test_mask_box_is_the_bounding_box_of_the_voxels_widened_within_the_shape():
    from custom.prompts import mask_box

    rng = np.random.default_rng(0)
    for shape, margin in [((9, 11, 13), 0), ((9, 11, 13), 2), ((7, 5), 3), ((6, 8, 10), (1, 0, 4))]:
        mask = np.zeros(shape, bool)
        points = [tuple(rng.integers(0, n) for n in shape) for _ in range(3)]
        for point in points:
            mask[point] = True
        present = np.argwhere(mask)
        margins = np.broadcast_to(margin, (len(shape),))
        expected = [
            (max(int(present[:, a].min()) - int(m), 0), min(int(present[:, a].max()) + 1 + int(m), n))
            for a, (m, n) in enumerate(zip(margins, shape))
        ]
        assert mask_box(mask, margin) == expected
        assert mask_box(torch.as_tensor(mask), margin) == expected
    assert mask_box(np.zeros((4, 4, 4), bool)) is None
