"""Click-simulating evaluation on each case's own grid: Dice and NSD after every click, written as they come.

Every (case, class present) pair is one target. Clicks are simulated from the ground truth on the stored grid by
a named, seeded protocol (:data:`custom.prompts.CLICK_PROTOCOLS`) and answered by the same
:class:`~custom.predictor.VolumetricPredictor` as inference: one prompt step per click in the windows it
affects, window embeddings shared from click to click and class to class, the mask updated on the stored grid.

``metrics.csv`` gets each target's rows as soon as the target is done; a rerun into the same folder (same
settings) skips the targets already there, so an interrupted evaluation loses at most the target in progress, and
gives the numbers an uninterrupted run gives: the classes of a case share window embeddings (an object's first
window may be one an earlier class opened), so a case cut short is replayed from its first class, the finished
ones without writing their rows again.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import compute_surface_dice
from scipy import ndimage
from torch import nn

from .files import append_line_durably, write_atomic, write_text_atomic
from .interaction import simulate_interaction
from .networks.common import as_flag
from .predictor import VolumetricPredictor
from .prompts import mask_box, simulated_click
from .seeding import seeded_generator

logger = logging.getLogger(__name__)

FIELDS = ("case", "class", "click", "point", "positive", "dice", "nsd", "seconds", "case_seconds")


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
        from .prompts import axial_axis, box_from_challenge, challenge_box

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
        for step in range(1, self.num_clicks + 1):
            planned = {}
            for c in classes:
                generator = self.click_generator(case, c * 1000 + step)
                click = simulated_click("cvpr25", composite == c, truths[c], step, generator)
                if click is not None:
                    planned[c] = click
            prompts = {}
            for c, (point, positive) in planned.items():
                tick = time.perf_counter()
                predictor.add_click(c, point.tolist(), bool(positive))
                prompts[c] = (positive, " ".join(str(int(v)) for v in point.tolist()), time.perf_counter() - tick)
            composite = score(step, prompts)
        seconds = time.perf_counter() - started
        for row in rows:
            row["case_seconds"] = round(seconds, 3)
        if self.report is not None:
            self.report.add_target([row for row in rows if not self.report.is_done(case, row["class"])])
        return rows


def cvpr25_summary(rows: Sequence[Mapping[str, Any]], num_clicks: int) -> dict[str, Any]:
    """The challenge's scores from per-(case, class, step) rows: per step the case's DSC (mean over its classes)
    and NSD (same mean, counted only where that mean DSC > 0.2, else 0); ``DSC_AUC`` / ``NSD_AUC``, the trapezoid
    over the click steps at x = 0 .. num_clicks - 1 (the box step excluded); ``DSC_Final`` / ``NSD_Final`` after
    the last click; means over cases. Per class the same without the gate, and the running time per case
    against the challenge's budget of 90 s per class."""
    by_case: dict[str, dict[int, dict[int, Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        by_case[row["case"]][int(row["click"])][int(row["class"])] = row
    steps = range(1, num_clicks + 1)
    x = np.arange(num_clicks, dtype=float)

    def auc(values: Sequence[float]) -> float:
        return float(np.trapezoid(values, x)) if len(values) > 1 else float(values[0])

    cases, per_class = [], defaultdict(lambda: defaultdict(list))
    for case, by_step in by_case.items():
        dsc = {k: float(np.mean([float(r["dice"]) for r in by_step[k].values()])) for k in by_step}
        nsd = {
            k: float(np.mean([float(r["nsd"]) for r in by_step[k].values()])) if dsc[k] > 0.2 else 0.0 for k in by_step
        }
        seconds = max(float(r.get("case_seconds") or 0) for r in by_step[0].values())
        classes = sorted(by_step[0])
        cases.append(
            {
                "case": case,
                "DSC_box": dsc[0],
                "DSC_AUC": auc([dsc[k] for k in steps]),
                "NSD_AUC": auc([nsd[k] for k in steps]),
                "DSC_Final": dsc[num_clicks],
                "NSD_Final": nsd[num_clicks],
                "seconds": seconds,
                "budget_seconds": 90.0 * len(classes),
            }
        )
        for c in classes:
            curve = [float(by_step[k][c]["dice"]) for k in steps]
            nsd_curve = [float(by_step[k][c]["nsd"]) for k in steps]
            per_class[str(c)]["DSC_AUC"].append(auc(curve))
            per_class[str(c)]["NSD_AUC"].append(auc(nsd_curve))
            per_class[str(c)]["DSC_Final"].append(curve[-1])
            per_class[str(c)]["NSD_Final"].append(nsd_curve[-1])
            per_class[str(c)]["DSC_box"].append(float(by_step[0][c]["dice"]))
    keys = ("DSC_box", "DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final")
    overall = {k: float(np.mean([c[k] for c in cases])) for k in keys} if cases else {}
    overall["cases"] = len(cases)
    overall["within_time_budget"] = sum(c["seconds"] <= c["budget_seconds"] for c in cases)
    return {
        "overall": overall,
        "per_class": {
            c: {k: float(np.mean(v)) for k, v in scores.items()} | {"targets": len(scores["DSC_AUC"])}
            for c, scores in sorted(per_class.items(), key=lambda kv: int(kv[0]))
        },
        "cases": cases,
    }


def summarize(
    rows: Sequence[Mapping[str, Any]],
    num_clicks: int,
    report_clicks: Sequence[int] = (1, 3, 5, 10),
    noc_thresholds: Sequence[float] = (0.80, 0.85, 0.90),
) -> dict[str, Any]:
    """Overall and per-class scores from per-click rows.

    ``dice@k`` / ``nsd@k``: mean over targets of the score after click ``k`` (the last click: honest);
    ``NoC@X``: mean number of clicks needed to reach Dice >= X, ``num_clicks`` when never reached;
    ``best_over_clicks_dice@k``: the paper's optimistic figure, the best Dice over clicks 1..k.
    """
    curves: dict[tuple[str, int], dict[int, Mapping[str, Any]]] = defaultdict(dict)
    for row in rows:
        curves[(row["case"], int(row["class"]))][int(row["click"])] = row

    def scores(targets) -> dict[str, float]:
        result: dict[str, float] = {"targets": len(targets)}
        for k in [k for k in report_clicks if k <= num_clicks]:
            result[f"dice@{k}"] = float(np.mean([float(curves[t][k]["dice"]) for t in targets]))
            result[f"nsd@{k}"] = float(np.mean([float(curves[t][k]["nsd"]) for t in targets]))
        for threshold in noc_thresholds:
            needed = [
                next((k for k in range(1, num_clicks + 1) if float(curves[t][k]["dice"]) >= threshold), num_clicks)
                for t in targets
            ]
            result[f"NoC@{round(threshold * 100)}"] = float(np.mean(needed))
        for k in [k for k in report_clicks if k <= num_clicks]:
            result[f"best_over_clicks_dice@{k}"] = float(
                np.mean([max(float(curves[t][j]["dice"]) for j in range(1, k + 1)) for t in targets])
            )
        return result

    targets = sorted(curves)
    if not targets:
        return {"overall": {"targets": 0}, "per_class": {}}
    classes = sorted({c for _, c in targets})
    timed = [float(row["seconds"]) for row in rows if str(row.get("positive", "")) != ""]
    return {
        "overall": scores(targets),
        "per_class": {str(c): scores([t for t in targets if t[1] == c]) for c in classes},
        "seconds_per_click": {
            "mean": float(np.mean(timed)) if timed else 0.0,
            "median": float(np.median(timed)) if timed else 0.0,
            "p90": float(np.percentile(timed, 90)) if timed else 0.0,
            "clicks": len(timed),
        },
    }


class EvaluationReport:
    """Evaluator handler: writes each target's rows to ``metrics.csv`` as it finishes, counts targets on a
    progress bar, and at the end writes ``summary.json`` and ``dice_vs_clicks.png`` and prints a table.

    (MONAI's ``MetricsSaver`` writes once the run ends; these rows are written as each target finishes, so that a
    run cut short continues.) A rerun into the same ``output_dir`` with the same settings continues: the targets
    whose rows are all in ``metrics.csv`` are skipped (cases with nothing left are not even loaded); rows of a
    target that was cut short are dropped. Other settings than the folder's are refused.

    Args:
        output_dir: where the files go.
        num_clicks: clicks per target.
        class_names: label value (as a string) -> name, for the table and the plot.
        settings: entries recorded in ``summary.json`` and ``evaluation.json`` (protocol, network, checkpoint...);
            a rerun must give the same ones.
        failures: the run's case list (its ``cases`` are pruned of finished ones; its ``failures`` recorded).
        progress: show a progress bar of targets.
    """

    def __init__(
        self,
        output_dir: str,
        num_clicks: int,
        class_names: Mapping[str, str] | None = None,
        settings: Mapping[str, Any] | None = None,
        failures: Any = None,
        progress: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.num_clicks = num_clicks
        self.class_names = {str(k): str(v) for k, v in (class_names or {}).items()}
        self.settings = dict(settings or {}, num_clicks=num_clicks)
        self.failures = failures
        self.progress = as_flag(progress, "progress")
        self.rows: list[dict[str, Any]] = []
        self._done: set[tuple[str, int]] = set()
        self._bar = None

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.csv"

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.start())
        engine.add_event_handler(Events.COMPLETED, lambda _: self.write())

    def is_done(self, case: str, target_class: int) -> bool:
        return (case, int(target_class)) in self._done

    def start(self) -> None:
        """Check the folder's settings, keep its finished targets, prune the case list, open the progress bar."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        recorded = self.output_dir / "evaluation.json"
        settings = json.loads(json.dumps(self.settings, default=str))
        if recorded.is_file() and self.metrics_path.is_file():
            earlier = json.loads(recorded.read_text())
            differ = {k: (earlier.get(k), v) for k, v in settings.items() if earlier.get(k) != v}
            if differ:
                raise ValueError(
                    f"{self.output_dir} holds an evaluation with other settings "
                    + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
                    + "; give another --output_dir or remove that folder"
                )
        write_text_atomic(recorded, json.dumps(settings, indent=2))
        self.rows = self._finished_rows()
        self._done = {(row["case"], int(row["class"])) for row in self.rows}
        write_text_atomic(self.metrics_path, self._csv(self.rows, header=True))
        pending = 0
        if self.failures is not None and hasattr(self.failures, "cases"):
            kept = []
            for case in self.failures.cases:
                left = [c for c in case.get("classes", []) if (case["case"], int(c)) not in self._done]
                if left or "classes" not in case:
                    kept.append(case)
                    pending += len(left)
            self.failures.cases[:] = kept
        if self._done:
            logger.info("%s: %d targets already evaluated, skipped", self.metrics_path, len(self._done))
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=pending or None, desc="targets", unit="target")

    def _finished_rows(self) -> list[dict[str, Any]]:
        """The rows of the targets that ``metrics.csv`` holds completely (every click, every field)."""
        if not self.metrics_path.is_file():
            return []
        by_target: dict[tuple[str, int], dict[int, dict[str, Any]]] = defaultdict(dict)
        with open(self.metrics_path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                try:
                    parsed = dict(row, **{"class": int(row["class"]), "click": int(row["click"])})
                    float(parsed["dice"]), float(parsed["nsd"]), float(parsed["seconds"])
                except (KeyError, TypeError, ValueError):
                    continue  # an unfinished last line
                by_target[(parsed["case"], parsed["class"])][parsed["click"]] = parsed
        rows = []
        for clicks in by_target.values():
            if set(clicks) == set(range(self.first_step, self.num_clicks + 1)):
                rows.extend(clicks[k] for k in sorted(clicks))
        return rows

    @property
    def first_step(self) -> int:
        """The cvpr25 protocol scores a step 0 (the box) before the clicks."""
        return 0 if self.settings.get("protocol") == "cvpr25" else 1

    @staticmethod
    def _csv(rows: Sequence[Mapping[str, Any]], header: bool = False) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in FIELDS} for row in rows)
        return buffer.getvalue()

    def add_target(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Finished targets (one, or a case's under cvpr25): their rows appended to ``metrics.csv`` (one write,
        flushed), the bar advanced."""
        if not self.metrics_path.is_file():
            write_text_atomic(self.metrics_path, self._csv([], header=True))
        append_line_durably(self.metrics_path, self._csv(rows))
        self.rows.extend(dict(row) for row in rows)
        targets = {(row["case"], int(row["class"])) for row in rows}
        self._done |= targets
        if self._bar is not None:
            self._bar.update(len(targets))

    def write(self) -> dict[str, Any]:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        click_rows = [row for row in self.rows if int(row["click"]) >= 1]
        summary = dict(self.settings, **summarize(click_rows, self.num_clicks))
        if self.first_step == 0:
            summary["cvpr25"] = cvpr25_summary(self.rows, self.num_clicks)
        summary["failed_cases"] = list(getattr(self.failures, "failures", []))
        summary["warnings"] = list(getattr(self.failures, "warnings", []))
        write_text_atomic(self.output_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        if self.rows:
            write_atomic(self.output_dir / "dice_vs_clicks.png", self._plot)
        print(self.table(summary))
        logger.info("evaluation written to %s", self.output_dir)
        return summary

    def _name(self, label: str) -> str:
        return self.class_names.get(label, f"class {label}")

    def table(self, summary: Mapping[str, Any]) -> str:
        keys = [
            k for k in ("dice@1", "dice@3", "dice@5", "dice@10", "nsd@1", "nsd@5", "NoC@85") if k in summary["overall"]
        ]
        lines = [f"{'target':<20}{'n':>5}" + "".join(f"{k:>10}" for k in keys)]
        for label, scores in summary["per_class"].items():
            lines.append(
                f"{self._name(label):<20}{scores['targets']:>5}" + "".join(f"{scores[k]:>10.3f}" for k in keys)
            )
        overall = summary["overall"]
        lines.append(f"{'overall':<20}{overall['targets']:>5}" + "".join(f"{overall[k]:>10.3f}" for k in keys))
        challenge = summary.get("cvpr25")
        if challenge and challenge["overall"].get("cases"):
            names = ("DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final")
            lines.append(f"{'CVPR25':<20}{'n':>5}" + "".join(f"{k:>10}" for k in names))
            for label, scores in challenge["per_class"].items():
                lines.append(
                    f"{self._name(label):<20}{scores['targets']:>5}" + "".join(f"{scores[k]:>10.3f}" for k in names)
                )
            overall = challenge["overall"]
            lines.append(f"{'cases':<20}{overall['cases']:>5}" + "".join(f"{overall[k]:>10.3f}" for k in names))
        timing = summary.get("seconds_per_click")
        if timing and timing["clicks"]:
            lines.append(
                f"seconds per click (click -> mask on the stored grid): median {timing['median']:.3f}, "
                f"mean {timing['mean']:.3f}, p90 {timing['p90']:.3f} over {timing['clicks']} clicks"
            )
        return "\n".join(lines)

    def _plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        by_class: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for row in self.rows:
            by_class[str(row["class"])][int(row["click"])].append(float(row["dice"]))
            by_class["overall"][int(row["click"])].append(float(row["dice"]))
        figure, axes = plt.subplots(figsize=(6, 4))
        clicks = list(range(1, self.num_clicks + 1))
        for label, curve in sorted(by_class.items(), key=lambda kv: kv[0] == "overall"):
            name = "overall" if label == "overall" else self._name(label)
            axes.plot(
                clicks,
                [np.mean(curve[k]) for k in clicks],
                marker="o",
                lw=3 if label == "overall" else 1,
                color="black" if label == "overall" else None,
                label=name,
            )
        axes.set(
            xlabel="clicks",
            ylabel="Dice (after the click)",
            ylim=(0, 1),
            xticks=clicks,
            title=f"Dice vs clicks ({self.settings.get('protocol', '')} protocol)",
        )
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="lower right")
        figure.tight_layout()
        figure.savefig(path, format="png", dpi=120)
        plt.close(figure)
