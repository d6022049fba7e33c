"""PromptedInferer and AutocastInferer called directly, as an engine calls them (no config): a batch of volumes with
prompts as tensors or in the image's metadata, per-volume failures, earlier label maps, and autocast."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from helpers import ThresholdNetwork
from monai.data import MetaTensor

from custom.inferer import AutocastInferer, PromptedInferer, _added
from custom.object_prompts import PROMPTS_META, CasePrompts, ObjectPrompts
from custom.predictor import VolumetricPredictor
from custom.transforms import PROMPT_FAILED, PROMPT_REPORT

SHAPE = (24, 20, 16)


def _batch(volumes: int = 2) -> MetaTensor:
    """Two volumes (1 mm, identity affine): volume 0 bright in two boxes, volume 1 in one."""
    images = torch.zeros(2, 1, *SHAPE)
    images[0, 0, 2:8, 3:9, 4:10] = 100
    images[0, 0, 14:20, 10:16, 4:10] = 100
    images[1, 0, 5:15, 5:15, 5:12] = 100
    names = ["a.nii.gz", "b.nii.gz"][:volumes]
    batch = MetaTensor(images[:volumes], affine=torch.eye(4), meta={"filename_or_obj": names})
    batch.is_batch = True
    return batch


def _object(label: int, *points: tuple[float, float, float]) -> ObjectPrompts:
    """An object with a positive click at each point (stored-grid voxels)."""
    return ObjectPrompts(label, tuple((tuple(float(c) for c in point), True) for point in points))


def _inferer(**kwargs) -> PromptedInferer:
    settings = {"spacing_mm": 1.0, "roi_size": 16, "intensity_normalization": None}
    settings.update({k: kwargs.pop(k) for k in list(kwargs) if k not in ("failures", "predictor_cache")})
    return PromptedInferer(functools.partial(VolumetricPredictor, **settings), **kwargs)


def test_each_object_gets_its_label_where_its_click_is_and_the_report_says_what_was_done():
    # volume 0: object 3 clicked in the first box, object 7 in the second; volume 1: one object and one without
    objects = [[_object(3, (5, 6, 7)), _object(7, (17, 13, 7))], [_object(2, (10, 10, 8)), _object(9)]]
    out = _inferer()(_batch(), ThresholdNetwork(), objects)
    assert out.shape == (2, 1, *SHAPE) and out.dtype == torch.int16
    first, second = out[0, 0], out[1, 0]
    assert (first[2:8, 3:9, 4:10] == 3).all() and (first[14:20, 10:16, 4:10] == 7).all()
    assert set(first.unique().tolist()) == {0, 3, 7}
    assert (second[5:15, 5:15, 5:12] == 2).all() and set(second.unique().tolist()) == {0, 2}  # 9 had no click
    reports = [json.loads(r) for r in out.meta[PROMPT_REPORT]]
    assert [len(r["objects"]) for r in reports] == [2, 2] and out.meta[PROMPT_FAILED] == [False, False]
    assert reports[0]["objects"][0]["clicks"] == 1 and reports[1]["objects"][1]["clicks"] == 0


def test_prompts_left_in_the_metadata_are_used_when_none_are_passed():
    batch = _batch(volumes=1)
    batch.meta[PROMPTS_META] = CasePrompts((_object(5, (17, 13, 7)),))
    out = _inferer()(batch, ThresholdNetwork())
    assert (out[0, 0][14:20, 10:16, 4:10] == 5).all() and not out[0, 0][2:8, 3:9, 4:10].any()
    assert PROMPTS_META not in out.meta  # the prompts are not handed on with the prediction


def test_no_prompts_and_plain_tensors_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="pass objects"):
        _inferer()(_batch(), ThresholdNetwork())
    with pytest.raises(ValueError, match="each of the 2 volume"):  # one volume's objects for a batch of two
        _inferer()(_batch(), ThresholdNetwork(), [[_object(1, (5, 6, 7))]])
    with pytest.raises(TypeError, match="MetaTensors"):
        _inferer()(torch.zeros(1, 1, *SHAPE), ThresholdNetwork(), [[_object(1, (0, 0, 0))]])


class _Failures:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def report_failure(self, message: str) -> None:
        self.messages.append(message)


def test_a_volume_that_fails_is_reported_and_flagged_and_the_others_are_segmented():
    objects = [[_object(1, (5, 6, 7))], [_object(1, (500, 10, 8))]]  # volume 1's click lies outside its image
    failures = _Failures()
    out = _inferer(failures=failures)(_batch(), ThresholdNetwork(), objects, case=["first", "second"])
    assert out.meta[PROMPT_FAILED] == [False, True]
    assert len(failures.messages) == 1 and failures.messages[0].startswith("case 'second'")
    assert (out[0, 0][2:8, 3:9, 4:10] == 1).all() and not out[1].any()
    with pytest.raises(Exception):  # without a failure list the error propagates
        _inferer()(_batch(), ThresholdNetwork(), objects)


def test_an_earlier_label_map_is_kept_where_no_window_reaches():
    # one object continues from an earlier map that also marks a far corner no window of its click reaches
    batch = MetaTensor(torch.zeros(1, 1, 64, 20, 16), affine=torch.eye(4))
    batch[0, 0, 2:8, 3:9, 4:10] = 100
    earlier = torch.zeros(1, 1, 64, 20, 16, dtype=torch.int16)
    earlier[0, 0, 60:63, 0:2, 0:2] = 4
    earlier[0, 0, 2:8, 3:9, 4:10] = 4
    out = _inferer(max_windows=1)(batch, ThresholdNetwork(), [[_object(4, (5, 6, 7))]], prev_mask=earlier)
    assert (out[0, 0][60:63, 0:2, 0:2] == 4).all() and (out[0, 0][2:8, 3:9, 4:10] == 4).all()
    plain = _inferer(max_windows=1)(batch, ThresholdNetwork(), [[_object(4, (5, 6, 7))]])
    assert not plain[0, 0][60:63, 0:2, 0:2].any()


def test_clicks_added_since_a_request_are_found_and_a_click_taken_back_is_noticed():
    a, b, c = ((1.0, 2.0, 3.0), True), ((4.0, 5.0, 6.0), False), ((7.0, 8.0, 9.0), True)
    assert _added([a, b], [b, a, c]) == [c]  # order of the earlier clicks does not matter
    assert _added([a], [a, a]) == [a]  # the same click twice counts twice
    assert _added([a, b], [a, c]) is None  # b was taken back: start the object again
    assert _added([], [a]) == [a]


class _DtypeProbe(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x.reshape(-1, 1), self.weight[:, None]).reshape(x.shape)
        self.seen.append(y.dtype)
        return y


def test_autocast_inferer_runs_the_network_under_autocast_and_returns_float32():
    from monai.inferers import SimpleInferer

    probe = _DtypeProbe()
    x = torch.randn(1, 1, 4, 4, 4)
    out = AutocastInferer(SimpleInferer(), "bfloat16")(x, probe)
    assert probe.seen == [torch.bfloat16] and out.dtype == torch.float32
    assert torch.allclose(out, x, atol=0.02)
    AutocastInferer(SimpleInferer(), None)(x, probe)
    assert probe.seen[-1] == torch.float32
