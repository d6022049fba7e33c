"""The training recipe in which prompts are needed: windows placed around the first click (centred as inference
centres them, or off-centre), that click handed to the interaction, the loss weighted over click steps, and the
validation metrics that need both the first click and the later ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, RandFlipd, ResizeWithPadOrCropd

from custom.engines import InteractiveSegmentation, mean_of_metrics, metric_difference, wrong_earlier_mask
from custom.spacing import AxisAlignedSpacingd
from custom.transforms import CropAroundClickd, WorldPointToVoxeld

ROI, SPACING = 32, 1.5


def _case(seed: int = 0):
    """A volume whose intensity is a linear function of world coordinates (trilinear resampling keeps it exact),
    with an anisotropic, shifted affine and a target blob."""
    affine = torch.tensor([[2.0, 0, 0, -30.0], [0, 1.0, 0, 12.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]], dtype=torch.float64)
    shape = (40, 60, 24)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    world = grid @ affine[:3, :3].numpy().T + affine[:3, 3].numpy()
    image = world @ np.array([1.0, 2.0, 3.0])
    label = np.zeros(shape, np.uint8)
    label[15:25, 20:40, 8:16] = 1
    return {
        "image": MetaTensor(torch.as_tensor(image, dtype=torch.float32)[None], affine=affine),
        "label": MetaTensor(torch.as_tensor(label)[None], affine=affine),
    }, affine


def _pipeline(centre_probability: float, max_offset_mm: float, flips: bool = True) -> Compose:
    transforms = [
        CropAroundClickd(
            ["image", "label"],
            roi_size=ROI,
            spacing_mm=SPACING,
            centre_probability=centre_probability,
            max_offset_mm=max_offset_mm,
        ),
        AxisAlignedSpacingd(["image", "label"], [SPACING] * 3, mode=["bilinear", "nearest"]),
        ResizeWithPadOrCropd(["image", "label"], [ROI] * 3),
    ]
    if flips:
        transforms += [RandFlipd(["image", "label"], prob=0.5, spatial_axis=a) for a in range(3)]
    transforms.append(WorldPointToVoxeld("first_click_world", image_key="image", output_key="first_click"))
    return Compose(transforms)


def test_the_first_click_lands_where_it_was_drawn_after_resampling_and_flips():
    data, affine = _case()
    pipeline = _pipeline(0.5, 12.0)
    on_target = 0
    for seed in range(12):
        pipeline.set_random_state(seed=seed)
        out = pipeline(dict(data))
        click = out["first_click"]
        assert click.shape == (3,) and bool(((click >= 0) & (click <= ROI - 1)).all())
        voxel = tuple(click.round().long().tolist())
        # the window's intensity encodes world position: at the click's voxel it is the click's own value, up to
        # half a window voxel in each direction
        world = (
            np.asarray(out["image"].affine)[:3, :3] @ np.asarray(voxel, float) + np.asarray(out["image"].affine)[:3, 3]
        )
        assert float(out["image"][0][voxel]) == pytest.approx(float(world @ [1.0, 2.0, 3.0]), abs=1e-3)
        assert "first_click_world" not in out  # consumed
        assert np.linalg.norm(world - _world_of(click, out)) <= 0.5 * SPACING * 3**0.5 + 1e-6
        on_target += int(out["label"][0][voxel] == 1)
    assert on_target >= 10  # drawn on the target; a boundary voxel may resample just outside it


def _world_of(click: torch.Tensor, out: dict) -> np.ndarray:
    affine = np.asarray(out["image"].affine)
    return affine[:3, :3] @ click.numpy().astype(float) + affine[:3, 3]


def test_centred_windows_put_the_click_at_the_centre_and_offset_ones_move_it():
    data, _ = _case()
    centred, offset = _pipeline(1.0, 12.0, flips=False), _pipeline(0.0, 12.0, flips=False)
    distances = []
    for seed in range(10):
        centred.set_random_state(seed=seed)
        offset.set_random_state(seed=seed)
        assert (centred(dict(data))["first_click"] - ROI / 2).abs().max() <= 1.0
        distances.append(float((offset(dict(data))["first_click"] - ROI / 2).abs().max()))
    assert max(distances) > 4 and max(distances) <= 12.0 / SPACING + 1.0  # up to 8 voxels, never outside


def test_an_offset_that_could_leave_the_window_is_refused():
    with pytest.raises(ValueError, match="max_offset_mm"):
        CropAroundClickd(["image", "label"], roi_size=32, spacing_mm=1.5, max_offset_mm=30.0)


class _Spy(torch.nn.Module):
    """Records each decode's points; predicts the previous logits (zeros first)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.calls = []
        self.mask_inputs = []

    def encode(self, image):
        return image

    def logits_size(self, grid):
        return list(grid)  # full-resolution logits, as the shipped variant's

    def decode(self, embedding, coords, labels, mask_input=None):
        self.calls.append((None if coords is None else coords.clone(), None if labels is None else labels.clone()))
        self.mask_inputs.append(None if mask_input is None else mask_input.clone())
        b, _, *size = embedding.shape
        logits = torch.full((b, 1, *size), -5.0) + self.weight if mask_input is None else mask_input
        return logits, None


def test_the_given_first_click_is_the_interactions_first_and_all_clicks_are_kept():
    spy = _Spy()
    model = InteractiveSegmentation(
        spy, num_click_steps=4, mask_only_step_range=None, last_step_mask_only=False, click_memory="all"
    )
    target = torch.zeros(2, 1, 16, 16, 16)
    target[:, :, 4:12, 4:12, 4:12] = 1
    first = torch.tensor([[5.0, 6.0, 7.0], [0.0, 0.0, 0.0]])  # the second lies off its target: simulated instead
    logits, weights = model(torch.zeros(2, 1, 16, 16, 16), target, torch.Generator().manual_seed(0), first, True)
    assert logits.shape == (4, 2, 1, 16, 16, 16)
    coords, labels = spy.calls[0]
    assert coords[0, 0].tolist() == [5.0, 6.0, 7.0] and labels[0, 0] == 1
    assert target[1, 0][tuple(coords[1, 0].long().tolist())] == 1  # a click drawn on the target
    assert [c.shape[1] for c, _ in spy.calls] == [1, 2, 3, 4]  # every click so far, every step
    assert torch.allclose(weights, torch.full((4,), 0.25))


def _span(mask: torch.Tensor, axis: int) -> tuple[int, int]:
    present = torch.nonzero(mask.any(dim=tuple(b for b in range(3) if b != axis)))[:, 0]
    return int(present[0]), int(present[-1]) + 1


def test_a_wrong_earlier_mask_holds_the_target_and_a_shifted_neighbour_without_wrapping_around():
    target = torch.zeros(24, 20, 16, dtype=torch.bool)
    target[2:10, 5:9, 4:8] = True  # extents 8, 4, 4; near the low end of axis 0
    directions = set()
    for seed in range(40):
        mask = wrong_earlier_mask(target, torch.Generator().manual_seed(seed))
        assert torch.equal(mask & target, target) and (mask & ~target).any()
        assert (mask & ~target).sum() <= target.sum()  # nothing wraps around from the far end
        moved = [a for a in range(3) if _span(mask, a) != _span(target, a)]
        assert len(moved) == 1, moved  # along one axis only
        axis = moved[0]
        (lo, hi), (union_lo, union_hi) = _span(target, axis), _span(mask, axis)
        shift = union_hi - hi if union_hi > hi else union_lo - lo
        clipped = union_lo == 0 or union_hi == target.shape[axis]
        assert abs(shift) <= hi - lo and (clipped or abs(shift) >= (hi - lo) / 2), (seed, axis, shift)
        directions.add((axis, shift > 0))
    assert len(directions) == 6  # every axis, both ways
    assert not wrong_earlier_mask(torch.zeros(8, 8, 8, dtype=torch.bool), torch.Generator()).any()


def test_an_interaction_from_a_wrong_earlier_mask_gets_it_as_mask_prompt_and_a_negative_click_on_the_wrong_part():
    spy = _Spy()  # answers a mask prompt with itself: the wrong part stays until a click is answered
    model = InteractiveSegmentation(
        spy, num_click_steps=2, mask_only_step_range=None, last_step_mask_only=False, wrong_prior_probability=1.0
    )
    target = torch.zeros(1, 1, 24, 24, 24)
    target[:, :, 8:16, 8:16, 8:16] = 1
    model(torch.zeros(1, 1, 24, 24, 24), target, torch.Generator().manual_seed(3))
    prior = spy.mask_inputs[0][0, 0]
    truth = target[0, 0] > 0
    assert torch.all(prior[truth] == 4.0) and (prior[~truth] == 4.0).any() and (prior == -4.0).any()
    coords, labels = spy.calls[1]
    assert labels[0, -1] == 0  # the second click is negative ...
    voxel = tuple(coords[0, -1].long().tolist())
    assert not truth[voxel] and prior[voxel] > 0  # ... on the wrongly held part
    plain = _Spy()
    InteractiveSegmentation(plain, num_click_steps=2, mask_only_step_range=None, last_step_mask_only=False)(
        torch.zeros(1, 1, 24, 24, 24), target, torch.Generator().manual_seed(3)
    )
    assert plain.mask_inputs[0] is None  # off by default: the interaction starts from nothing


class _MissingSpy(_Spy):
    """Answers a mask prompt with itself minus the target's core: the first prediction misses most of the target
    (a large false-negative region) and keeps the wrongly held part (a false-positive one)."""

    def decode(self, embedding, coords, labels, mask_input=None):
        logits, _ = super().decode(embedding, coords, labels, mask_input)
        logits = logits.clone()
        logits[..., 9:15, 9:15, 9:15] = -4.0
        return logits, None


def test_a_correction_weight_forces_the_second_click_negative_on_the_wrongly_held_part_and_weighs_its_step():
    target = torch.zeros(1, 1, 24, 24, 24)
    target[:, :, 8:16, 8:16, 8:16] = 1
    truth = target[0, 0] > 0
    second_labels = {}
    for weight in (1.0, 3.0):
        second_labels[weight] = []
        for seed in range(12):
            spy = _MissingSpy()
            model = InteractiveSegmentation(
                spy,
                num_click_steps=3,
                mask_only_step_range=None,
                last_step_mask_only=False,
                wrong_prior_probability=1.0,
                correction_weight=weight,
                click_memory="all",
            )
            _, weights = model(torch.zeros(1, 1, 24, 24, 24), target, torch.Generator().manual_seed(seed), None, True)
            coords, labels = spy.calls[1]
            second_labels[weight].append(int(labels[0, -1]))
            if weight != 1.0:
                voxel = tuple(coords[0, -1].long().tolist())
                held = spy.mask_inputs[0][0, 0] > 0  # the wrong earlier mask
                assert labels[0, -1] == 0 and held[voxel] and not truth[voxel]
                assert torch.allclose(weights, torch.tensor([1.0, weight, 1.0]) / (2 + weight))
            else:
                assert torch.allclose(weights, torch.full((3,), 1 / 3))
    assert 1 in second_labels[1.0]  # unforced, the protocol also clicks the missed target ...
    assert set(second_labels[3.0]) == {0}  # ... forced, always the wrongly held part
    with pytest.raises(ValueError, match="correction_weight"):
        InteractiveSegmentation(_Spy(), correction_weight=-1)


def test_mask_only_steps_weigh_what_they_are_given():
    model = InteractiveSegmentation(_Spy(), num_click_steps=5, mask_only_step_range=(2, 2), mask_only_weight=0.5)
    weights = model.step_weights(model.mask_only_steps(torch.Generator().manual_seed(0)))
    assert torch.allclose(weights, torch.tensor([1, 1, 0.5, 1, 0.5]) / 4.0)


def test_the_key_metric_is_the_mean_of_dice_after_one_and_five_clicks_and_the_gain_their_difference():
    from ignite.engine import Engine
    from monai.handlers import MeanDice, from_engine

    one = MeanDice(output_transform=from_engine(["pred_1", "label"]))
    five = MeanDice(output_transform=from_engine(["pred_5", "label"]))
    label = torch.zeros(1, 1, 4, 4, 4)
    label[..., :2] = 1  # 32 voxels
    pred_1 = torch.zeros_like(label)
    pred_1[..., :1] = 1  # 16 voxels inside: Dice 2*16/48
    outputs = [{"pred_1": list(pred_1), "pred_5": list(label), "label": list(label)}]
    engine = Engine(lambda e, batch: batch)
    mean_of_metrics([one, five]).attach(engine, "key")
    metric_difference(five, one).attach(engine, "gain")
    one.attach(engine, "dice_1")
    five.attach(engine, "dice_5")
    state = engine.run(outputs)
    assert state.metrics["dice_1"] == pytest.approx(2 / 3)
    assert state.metrics["key"] == pytest.approx((2 / 3 + 1) / 2)
    assert state.metrics["gain"] == pytest.approx(1 / 3)
