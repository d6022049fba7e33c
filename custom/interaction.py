"""The simulated interaction with the volumetric predictor, written once: clicks of a named protocol drawn from
the error of the object's current mask against its truth, each answered by the predictor. Used by validation
during training (:class:`custom.engines.ClickValidationStep`), evaluation
(:class:`custom.evaluation.ClickEvaluationStep`) and the benchmarks. The CVPR 2025 challenge's loop runs one
interaction per class in step, each drawing its clicks from the case's multi-class prediction (``current``).
(Training draws its clicks with the same :func:`custom.prompts.simulated_click`, on batched network windows whose
logits carry gradients, :class:`custom.engines.InteractiveSegmentation`: no predictor there.)"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .prompts import simulated_click


@dataclass
class ClickStep:
    """One step of :func:`simulate_interaction`: the click (None once the mask is perfect: nothing was sent), and
    the object's mask after it on the stored grid (the predictor's own tensor: clone it to keep it)."""

    index: int  # 1-based
    point: list[int] | None  # voxel indices of the stored grid
    positive: bool | None
    seconds: float  # from the click to the updated mask
    mask: torch.Tensor


def simulate_interaction(
    predictor: Any,
    key: Any,
    truth: torch.Tensor,
    num_clicks: int,
    protocol: str,
    generator: torch.Generator | Callable[[int], torch.Generator],
    region: Callable[[], tuple[slice, ...]] | None = None,
    current: Callable[[], torch.Tensor] | None = None,
) -> Iterator[ClickStep]:
    """Send ``num_clicks`` simulated clicks for object ``key`` to a predictor whose image is set, yielding each
    step.

    Args:
        predictor: a :class:`~custom.predictor.VolumetricPredictor` (``add_click(key, point, positive)``).
        key: the object's key in the predictor.
        truth: ``(D, H, W)`` bool on the stored grid.
        num_clicks: clicks to send (fewer are sent once the mask is perfect; every step is still yielded).
        protocol: a name of :data:`custom.prompts.CLICK_PROTOCOLS`.
        generator: the draws (:func:`custom.seeding.seeded_generator` of the target), or a function of the click's
            index giving each click its own (the challenge's loop seeds each step).
        region: the part of the grid where the mask and the truth can differ, asked before each click (both are
            empty outside it: the clicks are drawn there only, which is faster on a large image); None: all.
        current: ``(D, H, W)`` bool, the prediction the next click corrects, asked before each click; None: the
            object's own mask (the challenge corrects the object's class in the case's multi-class prediction).
    """
    mask = torch.zeros(truth.shape, dtype=torch.bool)
    everywhere = tuple(slice(0, n) for n in truth.shape)
    for index in range(1, num_clicks + 1):
        box = region() if region is not None else everywhere
        draws = generator if isinstance(generator, torch.Generator) else generator(index)
        corrected = current() if current is not None else mask
        click = simulated_click(protocol, corrected[box], truth[box], index, draws)
        if click is None:
            yield ClickStep(index, None, None, 0.0, mask)
            continue
        point = [int(c) + s.start for c, s in zip(click[0].tolist(), box)]
        started = time.perf_counter()
        mask = predictor.add_click(key, point, bool(click[1]))
        yield ClickStep(index, point, bool(click[1]), time.perf_counter() - started, mask)
