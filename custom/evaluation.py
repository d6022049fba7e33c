"""Click-simulating evaluation on each case's own grid: Dice and NSD after every click, written as they come.

Every (case, class present) pair is one target. Clicks are simulated from the ground truth on the stored grid by
a named, seeded protocol (:data:`custom.prompts.CLICK_PROTOCOLS`) and answered by the same
:class:`~custom.predictor.VolumetricPredictor` as inference: one prompt step per click in the windows it
affects, window embeddings shared from click to click and class to class, the mask updated on the stored grid.

:class:`custom.reports.EvaluationReport` writes each target's rows to ``metrics.csv`` as soon as the target is
done; a rerun into the same folder (same settings) skips the targets already there, so an interrupted evaluation
loses at most the target in progress, and gives the numbers an uninterrupted run gives: the classes of a case
share window embeddings (an object's first window may be one an earlier class opened), so a case cut short is
replayed from its first class, the finished ones without writing their rows again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import compute_surface_dice
from scipy import ndimage
from torch import nn

from .cases import box_from_challenge
from .interaction import simulate_interaction
from .predictor import VolumetricPredictor
from .prompts import axial_axis, challenge_box, mask_box, simulated_click
from .reports import EvaluationReport
from .seeding import seeded_generator

logger = logging.getLogger(__name__)


def _union_box(
    truth: tuple[slice, ...], predicted: tuple[slice, ...] | None, shape: Sequence[int], margin: int = 1
) -> tuple[slice, ...]:
    """The smallest box holding both boxes, widened by ``margin`` voxels within ``shape``."""
    boxes = [truth] + ([predicted] if predicted is not None else [])
    return tuple(
        slice(max(min(b[a].start for b in boxes) - margin, 0), min(max(b[a].stop for b in boxes) + margin, n))
        for a, n in enumerate(shape)
    )


def dice_and_nsd(prediction: torch.Tensor, truth: torch.Tensor, spacing: Sequence[float], tolerance_mm: float):
    """Dice and normalised surface Dice (tolerance in mm, ``spacing`` in mm) of two ``(D, H, W)`` bool masks.

    Both are computed over the bounding box of the two masks (plus one voxel): the same numbers as over the
    whole volume, at the cost of the objects' size, not the scan's.
    """
    box = mask_box(prediction | truth, margin=1)
    if box is None:
        return 1.0, 1.0  # both empty
    crop = tuple(slice(lo, hi) for lo, hi in box)
    prediction, truth = prediction[crop], truth[crop]
    overlap = int((prediction & truth).sum())
    dice = 2 * overlap / (int(prediction.sum()) + int(truth.sum()))
    if not prediction.any() or not truth.any():
        return dice, 0.0
    nsd = compute_surface_dice(
        prediction[None, None].float(),
        truth[None, None].float(),
        class_thresholds=[tolerance_mm],
        include_background=True,
        spacing=[float(s) for s in spacing],
    )
    return dice, float(nsd[0, 0])


class ClickEvaluationStep:
    """``iteration_update`` of the evaluation ``SupervisedEvaluator``: one case (all its pending classes) per
    iteration; each target's rows go to ``report`` as soon as the target is done.

    The batch holds the ``image`` and the ``label`` as stored (the predictor resamples), ``case``, ``classes``
    and ``modality``. Returns ``{"rows": [...]}``: one row per (class, click) with case, class, click, whether
    it was positive, dice, nsd, and the seconds from the click to the updated mask on the stored grid.
    ``point`` is the click (voxel indices of the stored grid, ``"i j k"``): a target's clicks can be replayed
    through inference.

    Args:
        predictor: makes the predictor for a network, ``predictor(network)`` (its settings bound: window placement,
            growth, click memory, autocast), as :class:`~custom.inferer.PromptedInferer` takes it.
        num_clicks: clicks per target.
        protocol: a name of :data:`custom.prompts.CLICK_PROTOCOLS`.
        seed: with the case and class, seeds the clicks: a target gets the same clicks in every run.
        nsd_tolerance_mm: NSD tolerance.
        failures: an object with ``report_failure(message)`` (the run's case list): a case that fails is
            reported there and the evaluation goes on.
        report: the :class:`EvaluationReport` that writes the rows and knows the targets already done.
        no_box_classes: with ``protocol="cvpr25"``: classes that get no box (the challenge does so for vessel-like
            classes): their step 0 scores 0 and their first click is at the centre of the largest ground-truth
            component.
    """

    def __init__(
        self,
        predictor: Callable[[nn.Module], VolumetricPredictor] = VolumetricPredictor,
        num_clicks: int = 10,
        protocol: str = "uniform",
        seed: int = 2023,
        nsd_tolerance_mm: float = 1.0,
        failures: Any = None,
        report: EvaluationReport | None = None,
        no_box_classes: Sequence[int] = (),
    ) -> None:
        if num_clicks < 1:
            raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
        empty, full = torch.zeros(1, 1, 1, dtype=torch.bool), torch.ones(1, 1, 1, dtype=torch.bool)
        simulated_click(protocol, empty, full, 1, torch.Generator())  # fails early on an unknown protocol
        if protocol == "cvpr25" and (num_clicks, float(nsd_tolerance_mm)) != (5, 2.0):
            logger.warning(
                f"protocol cvpr25 with num_clicks {num_clicks} and nsd_tolerance_mm {nsd_tolerance_mm}: the challenge "
                "scores 5 clicks and NSD at 2 mm (configs/evaluate_cvpr25.json sets all three)"
            )
        self.predictor = predictor
        self.num_clicks = num_clicks
        self.protocol = protocol
        self.seed = seed
        self.nsd_tolerance_mm = nsd_tolerance_mm
        self.failures = failures
        self.report = report
        self.no_box_classes = {int(c) for c in no_box_classes}

    def click_generator(self, case: str, target_class: int) -> torch.Generator:
        return seeded_generator(self.seed, f"{case}/{target_class}")

    def __call__(self, engine, batchdata: Mapping[str, Any]) -> dict[str, list]:
        case = batchdata["case"][0] if "case" in batchdata else "case"
        try:
            return {"rows": self.evaluate_case(engine.network, batchdata, case)}
        except Exception as err:  # one bad case must not stop the others
            if self.failures is None:
                raise
            self.failures.report_failure(f"case {case!r}: {type(err).__name__}: {err}")
            return {"rows": []}

    def evaluate_case(self, network, batchdata: Mapping[str, Any], case: str) -> list[dict[str, Any]]:
        image, label = batchdata["image"][0], batchdata["label"][0]
        truth_map = torch.as_tensor(label.as_tensor() if isinstance(label, MetaTensor) else label)[0]
        spacing = affine_to_spacing(np.asarray(label.affine, np.float64))
        classes = batchdata.get("classes")
        classes = [int(c) for c in classes] if classes is not None else [int(c) for c in truth_map.unique() if c > 0]
        pending = [c for c in classes if self.report is None or not self.report.is_done(case, c)]
        if not pending:
            return []
        modality = batchdata.get("modality", [""])[0]
        predictor = self.predictor(network)
        network.eval()
        started = time.perf_counter()
        source = {"filename_or_obj": image.meta.get("filename_or_obj", case)}
        predictor.set_image(MetaTensor(image.as_tensor(), affine=image.affine, meta=source), modality=str(modality))
        if self.protocol == "cvpr25":
            given = batchdata.get("challenge_boxes")
            given = json.loads(given[0]) if given is not None and given[0] else None
            return self._evaluate_case_cvpr25(
                predictor, truth_map, spacing, np.asarray(label.affine), classes, case, given, started
            )
        labels = truth_map.numpy()
        truth_boxes = ndimage.find_objects(labels if labels.dtype.kind in "iu" else labels.astype(np.int32))
        rows = []
        # finished classes before a pending one are replayed (rows dropped): what they leave in the predictor's
        # embedding cache decides where later classes' first windows go
        for target_class in classes[: classes.index(pending[-1]) + 1]:
            truth_box = truth_boxes[target_class - 1]

            def region(truth_box=truth_box, target_class=target_class) -> tuple[slice, ...]:
                # the mask and the truth are empty outside this box: clicks and scores need only the box
                return _union_box(truth_box, predictor.extent(target_class), truth_map.shape)

            truth = truth_map == target_class
            generator = self.click_generator(case, target_class)
            dice = nsd = 0.0
            target_rows = []
            for step in simulate_interaction(
                predictor, target_class, truth, self.num_clicks, self.protocol, generator, region
            ):
                if step.point is not None:  # None: already perfect; the scores stay
                    box = region()
                    dice, nsd = dice_and_nsd(step.mask[box], truth[box], spacing, self.nsd_tolerance_mm)
                target_rows.append(
                    {
                        "case": case,
                        "class": target_class,
                        "click": step.index,
                        "point": "" if step.point is None else " ".join(str(c) for c in step.point),
                        "positive": "" if step.positive is None else int(step.positive),
                        "dice": round(dice, 6),
                        "nsd": round(nsd, 6),
                        "seconds": round(step.seconds, 4),
                    }
                )
            predictor.reset(target_class)
            if target_class not in pending:
                continue
            if self.report is not None:
                self.report.add_target(target_rows)
            rows.extend(target_rows)
        return rows

    def _evaluate_case_cvpr25(
        self,
        predictor,
        truth_map: torch.Tensor,
        spacing: np.ndarray,
        affine: np.ndarray,
        classes: Sequence[int],
        case: str,
        given_boxes: Sequence[Mapping[str, float]] | None,
        started: float,
    ) -> list[dict[str, Any]]:
        """The CVPR 2025 challenge's interaction on one case (``CVPR25_iter_eval.py``): step 0 a box per class
        (the case's own boxes, else the challenge's box of each ground-truth class, on slices across the array
        axis that ``affine`` runs most nearly head to foot), then ``num_clicks`` steps
        that refine every class at once, each click at the centre of the largest component of that class's error
        on the multi-class prediction (:func:`custom.prompts.largest_error_click`). Scores on that prediction."""
        axial = axial_axis(affine)
        rows: list[dict[str, Any]] = []
        order = [(c, c) for c in sorted(classes)]
        truths = {c: truth_map == c for c in classes}

        def score(step: int, prompts: Mapping[int, tuple[str, Any, float]]) -> torch.Tensor:
            composite = predictor.label_map(order)
            for c in classes:
                predicted = composite == c
                dice, nsd = dice_and_nsd(predicted, truths[c], spacing, self.nsd_tolerance_mm)
                kind, where, seconds = prompts.get(c, ("", "", 0.0))
                rows.append(
                    {
                        "case": case,
                        "class": c,
                        "click": step,
                        "point": where,
                        "positive": kind,
                        "dice": round(dice, 6),
                        "nsd": round(nsd, 6),
                        "seconds": round(seconds, 4),
                    }
                )
            return composite

        prompts: dict[int, tuple[str, Any, float]] = {}
        for index, c in enumerate(classes):
            if c in self.no_box_classes:
                continue
            box = None
            if given_boxes is not None and index < len(given_boxes) and given_boxes[index]:
                box = given_boxes[index]
            if box is not None:  # the case's own boxes are in the challenge's (D, H, W) array order
                low, high = box_from_challenge(box)
            else:
                low, high = box_from_challenge(challenge_box(truths[c], axial_axis=axial), axial_axis=axial)
            tick = time.perf_counter()
            predictor.add_box(c, low, high)
            prompts[c] = ("box", " ".join(str(int(v)) for v in low + high), time.perf_counter() - tick)
        composite = score(0, prompts)
        # one interaction per class, advanced in step: every click of a step is drawn from the prediction the
        # step starts from (the generators are lazy: ``composite`` is replaced only once all classes have clicked)
        interactions = [
            simulate_interaction(
                predictor,
                c,
                truths[c],
                self.num_clicks,
                "cvpr25",
                lambda step, c=c: self.click_generator(case, c * 1000 + step),
                current=lambda c=c: composite == c,
            )
            for c in classes
        ]
        for step in range(1, self.num_clicks + 1):
            prompts = {}
            for c, interaction in zip(classes, interactions):
                click = next(interaction)
                if click.point is not None:
                    prompts[c] = (int(click.positive), " ".join(str(v) for v in click.point), click.seconds)
            composite = score(step, prompts)
        seconds = time.perf_counter() - started
        for row in rows:
            row["case_seconds"] = round(seconds, 3)
        if self.report is not None:
            self.report.add_target([row for row in rows if not self.report.is_done(case, row["class"])])
        return rows
