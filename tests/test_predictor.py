"""The volumetric predictor: one prompt step per click, bounded caches and grids, incremental paste-back, and the
same masks through evaluation and inference; resumable evaluation."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import (
    REPO_ROOT,
    ThresholdNetwork,
    bright,
    evaluate,
    read_output,
    run_inference,
    two_blob_volumes,
    write_msd_dataset,
)
from monai.data import MetaTensor

from custom.predictor import VolumetricPredictor


class CountingNetwork(ThresholdNetwork):
    """Predicts nothing (so every click is a further click) and counts its prompt steps."""

    def __init__(self, img_size: int = 32) -> None:
        super().__init__(img_size)
        self.decoded = 0

    def decode(self, embedding, point_coords, point_labels, mask_input=None):
        self.decoded += 1
        return torch.full_like(embedding, -10.0), embedding.new_zeros(embedding.shape[0], 1)


class BallNetwork(ThresholdNetwork):
    """An imperfect network whose answer depends on every prompt: the previous logits, +10 within 3 voxels of a
    positive click and -10 within 3 voxels of a negative one (full resolution, as ``ThresholdNetwork``)."""

    def decode(self, embedding, point_coords, point_labels, mask_input=None):
        size = embedding.shape[2:]
        if mask_input is None:
            logits = torch.full((1, 1, *size), -10.0)
        else:  # the mask prompt of an earlier mask comes at the low-res size of a real network
            logits = torch.nn.functional.interpolate(mask_input, size=size, mode="trilinear")
        grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij"), -1)
        for point, label in zip(point_coords[0], point_labels[0]):
            if label >= 0:
                near = (grid - point).norm(dim=-1) <= 3
                logits[0, 0][near] = 10.0 if label == 1 else -10.0
        return logits, embedding.new_zeros(1, 1)


def _image(shape=(20, 24, 18), spacing=1.5) -> MetaTensor:
    return MetaTensor(torch.full((1, *shape), 100.0), affine=torch.diag(torch.tensor([spacing] * 3 + [1.0])))


def test_a_k_click_evaluation_of_a_one_window_object_makes_k_prompt_steps(tmp_path):
    network = CountingNetwork()
    _, rows = evaluate(tmp_path, write_msd_dataset(tmp_path / "data", two_blob_volumes()), network, num_clicks=6)
    assert len(rows) == 2 * 6 and all(r["positive"] == "1" for r in rows)
    assert network.decoded == 2 * 6  # not 1 + 2 + ... + 6: each click one step, from the saved logits
    assert network.encoded == 2  # one window per case, encoded once


def test_each_click_reuses_the_window_and_the_embedding():
    network = CountingNetwork()
    predictor = VolumetricPredictor(network, roi_size=32, intensity_normalization=None)
    predictor.set_image(_image())
    for step, point in enumerate(([10, 12, 9], [11, 12, 9], [9, 10, 8], [10, 14, 10]), start=1):
        predictor.add_click("a", point, positive=True)
        assert network.decoded == step and network.encoded == 1
    assert predictor.report("a")["prompt_steps"] == 4 and len(predictor.report("a")["windows"]) == 1


def test_the_embedding_cache_is_bounded():
    network = CountingNetwork(img_size=16)
    predictor = VolumetricPredictor(network, roi_size=16, max_cached_embeddings=2, intensity_normalization=None)
    predictor.set_image(_image((80, 20, 20)))
    for i, x in enumerate((8, 28, 48, 68)):
        predictor.add_click(i, [x, 10, 10], positive=True)
    assert len(predictor.embeddings) == 2 and network.encoded == 4
    predictor.add_click(4, [68, 10, 10], positive=True)  # the most recent window is still cached
    assert network.encoded == 4


def test_the_stored_mask_changes_only_where_the_changed_windows_lie():
    predictor = VolumetricPredictor(BallNetwork(img_size=16), roi_size=16, intensity_normalization=None)
    predictor.set_image(_image((80, 20, 20)))
    earlier = torch.zeros(80, 20, 20, dtype=torch.bool)
    earlier[2:10, 5:15, 5:15] = True
    earlier[60:70, 5:15, 5:15] = True
    predictor.set_mask("a", earlier)
    mask = predictor.add_click("a", [64, 10, 10], positive=False).clone()
    # the click's window is [56, 72) along axis 0: there the prediction changed, elsewhere the earlier mask stays
    assert torch.equal(mask[:56], earlier[:56]) and torch.equal(mask[72:], earlier[72:])
    assert not mask[64, 10, 10] and mask[61, 6, 6]


def test_a_grid_too_large_to_allocate_is_refused_before_allocating():
    predictor = VolumetricPredictor(CountingNetwork(), intensity_normalization=None)
    header_error = MetaTensor(torch.zeros(1, 100, 100, 80), affine=torch.diag(torch.tensor([5.0, 5.0, 5.0, 1.0])))
    expected = r"\(100, 100, 80\) voxels of \[5.0, 5.0, 5.0\] mm .* a \(331, 331, 264\) grid \(28,924,104 voxels"
    with pytest.raises(ValueError, match=expected + r".*max_grid_voxels=1,000,000"):
        VolumetricPredictor(CountingNetwork(), max_grid_voxels=10**6).set_image(header_error)
    assert predictor.set_image(header_error).network_shape == (331, 331, 264)


def test_clicks_outside_the_image_and_in_no_window_are_handled():
    predictor = VolumetricPredictor(CountingNetwork(), roi_size=32, intensity_normalization=None)
    predictor.set_image(_image())
    with pytest.raises(ValueError, match=r"point \[30, 2, 2\] \(voxels\) is outside the image"):
        predictor.add_click("a", [30, 2, 2], positive=True)
    predictor.add_click("a", [5, 5, 5], positive=False)  # nothing predicted, nothing to correct: no window
    assert predictor.report("a")["ignored_clicks"] == 1 and not predictor.mask("a").any()


def test_the_same_clicks_give_the_same_mask_through_evaluation_and_inference(tmp_path):
    blobs = two_blob_volumes()
    dataset = write_msd_dataset(tmp_path / "data", blobs)
    _, rows = evaluate(tmp_path, dataset, BallNetwork(), num_clicks=4)
    case_rows = [r for r in rows if r["case"] == "case0"]
    points = [[int(c) for c in r["point"].split()] for r in case_rows]
    labels = [int(r["positive"]) for r in case_rows]
    assert 0 in labels and 1 in labels  # corrections in both directions
    out = run_inference(
        tmp_path / "infer",
        BallNetwork(),
        input_dict={"image": str(dataset / "imagesTr/case0.nii.gz"), "points": points, "point_labels": labels},
        spacing_mm=[1.5, 1.5, 1.5],
    )
    mask, _, report = read_output(out, "case0")
    truth = blobs[0] > 0
    dice = 2 * ((mask > 0) & truth).sum() / ((mask > 0).sum() + truth.sum())
    assert dice == pytest.approx(float(case_rows[-1]["dice"]), abs=1e-6)
    assert report["objects"][0]["prompt_steps"] == 4


class Interrupt(BaseException):
    """What a kill looks like to the evaluation: not an error of one case."""


def test_an_interrupted_evaluation_resumes_without_recomputing(tmp_path):
    volumes = two_blob_volumes() + [np.roll(b, 2, axis=0) for b in two_blob_volumes()]
    dataset = write_msd_dataset(tmp_path / "data", volumes)

    class DiesAfterTwoTargets(CountingNetwork):
        def decode(self, *args, **kwargs):
            if self.decoded == 2 * 3:
                raise Interrupt
            return super().decode(*args, **kwargs)

    with pytest.raises(Interrupt):
        evaluate(tmp_path, dataset, DiesAfterTwoTargets(), num_clicks=3)
    metrics = tmp_path / "eval" / "metrics.csv"
    with open(metrics) as handle:
        first = list(csv.DictReader(handle))
    assert [(r["case"], r["click"]) for r in first] == [(f"case{i}", str(k)) for i in (0, 1) for k in (1, 2, 3)]
    with open(metrics, "a") as handle:
        handle.write("case2,1,1,4 5")  # what a kill during a write leaves: an unfinished line
    again = CountingNetwork()
    summary, rows = evaluate(tmp_path, dataset, again, num_clicks=3)
    assert again.decoded == 2 * 3  # only the two targets left
    assert rows[:6] == first and len(rows) == 12 and summary["overall"]["targets"] == 4
    with pytest.raises(RuntimeError) as err:
        evaluate(tmp_path, dataset, CountingNetwork(), num_clicks=3, protocol="paper")
    assert "other settings protocol: 'uniform' there, 'paper' now" in str(err.value.__cause__)


def test_inference_report_counts_the_work(tmp_path):
    shape = (20, 24, 18)
    image = bright(shape)
    path = tmp_path / "one.nii.gz"
    nib.Nifti1Image(image.astype(np.float32), np.diag([1.5, 1.5, 1.5, 1.0])).to_filename(path)
    entry = {"image": str(path), "points": [[10, 12, 9], [12, 12, 9]], "point_labels": [1, 0]}
    _, _, report = read_output(run_inference(tmp_path, CountingNetwork(), input_dict=entry), "one")
    assert report["objects"][0]["prompt_steps"] == 2 and report["objects"][0]["windows_encoded"] == 1
    assert report["click_memory"] == json.loads((REPO_ROOT / "bundle/configs/inference.json").read_text())[
        "click_memory"
    ] and json.dumps(report)


class ConeNetwork(ThresholdNetwork):
    """Logits 10 minus the distance (voxels) to the newest positive click: a ball of radius 10, surest at its centre."""

    def decode(self, embedding, point_coords, point_labels, mask_input=None):
        size = embedding.shape[2:]
        grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij"), -1)
        logits = 10.0 - (grid - point_coords[0, -1]).norm(dim=-1)
        return logits[None, None], embedding.new_zeros(1, 1)


def test_overlapping_objects_go_to_the_surer_one_in_the_label_map():
    predictor = VolumetricPredictor(ConeNetwork(img_size=32), roi_size=32, intensity_normalization=None)
    predictor.set_image(_image((36, 20, 20)))
    centres = {"a": (12, 10, 10), "b": (25, 10, 10)}  # the midplane x = 18.5 holds no voxel: no ties
    for key, centre in centres.items():
        predictor.add_click(key, list(centre), positive=True)
    assert (predictor.mask("a") & predictor.mask("b")).sum() > 100  # the balls overlap
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in (36, 20, 20)], indexing="ij"), -1)
    distance = {key: (grid - torch.tensor(centre, dtype=torch.float32)).norm(dim=-1) for key, centre in centres.items()}
    expected = torch.zeros(36, 20, 20, dtype=torch.int16)
    expected[predictor.mask("a")] = 1
    expected[predictor.mask("b") & ~(predictor.mask("a") & (distance["a"] < distance["b"]))] = 2
    label_map = predictor.label_map([("a", 1), ("b", 2)])
    assert torch.equal(label_map, expected)
    assert label_map[18, 10, 10] == 1 and label_map[19, 10, 10] == 2  # each side of the midplane
