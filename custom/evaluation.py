"""Click-simulating evaluation on each case's own grid: Dice and NSD after every click, summaries and plots.

Every (case, class present) pair is one target. Clicks are simulated from the ground truth on the stored
grid by a named, seeded protocol (:data:`custom.prompts.CLICK_PROTOCOLS`), mapped to the resampled image,
answered by the same :class:`~custom.inferer.PromptedWindowInferer` as inference (window embeddings are kept
from click to click and class to class, so a further click costs only the decoder), and the prediction is
pasted back by nearest neighbour before it is scored.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import time
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.metrics import compute_dice, compute_surface_dice

from .inferer import PromptedWindowInferer
from .prompts import simulated_click

logger = logging.getLogger(__name__)


class GridMapping:
    """Nearest-neighbour correspondence between a case's stored grid and its resampled grid.

    Args:
        original_affine: ``(4, 4)`` voxel -> world of the stored grid.
        original_shape: its spatial shape.
        resampled_affine: ``(4, 4)`` voxel -> world of the resampled (oriented) grid.
        resampled_shape: its spatial shape.
    """

    def __init__(self, original_affine, original_shape, resampled_affine, resampled_shape) -> None:
        original = np.asarray(original_affine, dtype=np.float64)
        resampled = np.asarray(resampled_affine, dtype=np.float64)
        self.original_to_resampled = np.linalg.inv(resampled) @ original
        self.original_shape = tuple(int(s) for s in original_shape)
        self.resampled_shape = tuple(int(s) for s in resampled_shape)
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in self.original_shape], indexing="ij"), -1).reshape(-1, 3)
        nearest = np.rint(grid @ self.original_to_resampled[:3, :3].T + self.original_to_resampled[:3, 3]).astype(int)
        self.inside = torch.as_tensor(np.all((nearest >= 0) & (nearest < self.resampled_shape), axis=1))
        inside = nearest[self.inside.numpy()]
        self.source = torch.as_tensor(np.ravel_multi_index(tuple(inside.T), self.resampled_shape))

    def points_to_resampled(self, points: torch.Tensor) -> torch.Tensor:
        """``(N, 3)`` voxel indices of the stored grid -> float voxel indices of the resampled grid."""
        points = np.asarray(points, dtype=np.float64)
        mapped = points @ self.original_to_resampled[:3, :3].T + self.original_to_resampled[:3, 3]
        return torch.as_tensor(mapped, dtype=torch.float32)

    def to_original(self, volume: torch.Tensor) -> torch.Tensor:
        """A resampled ``(D, H, W)`` volume on the stored grid (outside the resampled grid: zero / False)."""
        out = torch.zeros(int(np.prod(self.original_shape)), dtype=volume.dtype)
        out[self.inside] = volume.reshape(-1).cpu()[self.source]
        return out.reshape(self.original_shape)


def dice_and_nsd(prediction: torch.Tensor, truth: torch.Tensor, spacing: Sequence[float], tolerance_mm: float):
    """Dice and normalised surface Dice (tolerance in mm, ``spacing`` in mm) of two ``(D, H, W)`` bool masks."""
    y_pred, y = prediction[None, None].float(), truth[None, None].float()
    dice = float(compute_dice(y_pred, y, include_background=True, ignore_empty=False)[0, 0])
    if not prediction.any():
        return dice, 0.0
    nsd = compute_surface_dice(
        y_pred, y, class_thresholds=[tolerance_mm], include_background=True, spacing=[float(s) for s in spacing]
    )
    return dice, float(nsd[0, 0])


class ClickEvaluationStep:
    """``iteration_update`` of the evaluation ``SupervisedEvaluator``: one case (all its classes) per iteration.

    The batch holds the resampled ``image`` and the ``label`` on the stored grid. Returns ``{"rows": [...]}``,
    one row per (class, click): case, class, click, dice, nsd, seconds.

    Args:
        inferer: answers the clicks (window placement, growth, click memory, autocast).
        num_clicks: clicks per target.
        protocol: ``"uniform"`` or ``"paper"``.
        seed: with the case and class, seeds the clicks: a target gets the same clicks in every run.
        nsd_tolerance_mm: NSD tolerance.
        failures: an object with ``report_failure(message)`` (the run's case list): a case that fails is
            reported there and the evaluation goes on.
    """

    def __init__(
        self,
        inferer: PromptedWindowInferer,
        num_clicks: int = 10,
        protocol: str = "uniform",
        seed: int = 2023,
        nsd_tolerance_mm: float = 1.0,
        failures: Any = None,
    ) -> None:
        if num_clicks < 1:
            raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
        simulated_click(
            protocol,
            torch.zeros(1, 1, 1, dtype=torch.bool),
            torch.ones(1, 1, 1, dtype=torch.bool),
            1,
            torch.Generator(),
        )  # fails early on an unknown protocol name
        self.inferer = inferer
        self.num_clicks = num_clicks
        self.protocol = protocol
        self.seed = seed
        self.nsd_tolerance_mm = nsd_tolerance_mm
        self.failures = failures

    def click_generator(self, case: str, target_class: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(f"{case}/{target_class}".encode()))

    def __call__(self, engine, batchdata: Mapping[str, Any]) -> dict[str, list]:
        case = batchdata["case"][0] if "case" in batchdata else "case"
        try:
            return {"rows": self.evaluate_case(engine.network, batchdata, case, engine.state.device)}
        except Exception as err:  # one bad case must not stop the others
            if self.failures is None:
                raise
            self.failures.report_failure(f"case {case!r}: {type(err).__name__}: {err}")
            return {"rows": []}

    def evaluate_case(self, network, batchdata, case: str, device: torch.device | str = "cpu") -> list[dict[str, Any]]:
        image = batchdata["image"][0].to(device)
        label = batchdata["label"][0]
        truth_map = torch.as_tensor(label)[0]
        original_affine = np.asarray(label.affine)
        spacing = np.sqrt((original_affine[:3, :3] ** 2).sum(axis=0))
        mapping = GridMapping(original_affine, truth_map.shape, np.asarray(image.affine), image.shape[1:])
        embeddings: dict = {}
        rows = []
        network.eval()
        for target_class in [int(c) for c in torch.unique(truth_map) if c > 0]:
            truth = truth_map == target_class
            generator = self.click_generator(case, target_class)
            prediction = torch.zeros_like(truth)
            coords, labels = [], []
            dice = nsd = 0.0
            for click_index in range(1, self.num_clicks + 1):
                started = time.perf_counter()
                click = simulated_click(self.protocol, prediction, truth, click_index, generator)
                if click is not None:  # None: already perfect; the scores stay
                    coords.append(mapping.points_to_resampled(click[0][None])[0])
                    labels.append(click[1])
                    logits, _ = self.inferer.segment_volume(
                        image, network, torch.stack(coords)[None], torch.tensor([labels]), embeddings=embeddings
                    )
                    prediction = mapping.to_original(logits[0] > 0)
                    dice, nsd = dice_and_nsd(prediction, truth, spacing, self.nsd_tolerance_mm)
                rows.append(
                    {
                        "case": case,
                        "class": target_class,
                        "click": click_index,
                        "dice": round(dice, 6),
                        "nsd": round(nsd, 6),
                        "seconds": round(time.perf_counter() - started, 4),
                    }
                )
        return rows


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
    curves: dict[tuple[str, int], dict[int, dict[str, float]]] = defaultdict(dict)
    for row in rows:
        curves[(row["case"], int(row["class"]))][int(row["click"])] = row

    def scores(targets) -> dict[str, float]:
        result: dict[str, float] = {"targets": len(targets)}
        for k in [k for k in report_clicks if k <= num_clicks]:
            result[f"dice@{k}"] = float(np.mean([curves[t][k]["dice"] for t in targets]))
            result[f"nsd@{k}"] = float(np.mean([curves[t][k]["nsd"] for t in targets]))
        for threshold in noc_thresholds:
            needed = [
                next((k for k in range(1, num_clicks + 1) if curves[t][k]["dice"] >= threshold), num_clicks)
                for t in targets
            ]
            result[f"NoC@{round(threshold * 100)}"] = float(np.mean(needed))
        for k in [k for k in report_clicks if k <= num_clicks]:
            result[f"best_over_clicks_dice@{k}"] = float(
                np.mean([max(curves[t][j]["dice"] for j in range(1, k + 1)) for t in targets])
            )
        return result

    targets = sorted(curves)
    if not targets:
        return {"overall": {"targets": 0}, "per_class": {}}
    classes = sorted({c for _, c in targets})
    return {
        "overall": scores(targets),
        "per_class": {str(c): scores([t for t in targets if t[1] == c]) for c in classes},
    }


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class EvaluationReport:
    """Evaluator handler: collects the rows of every iteration and, at the end, writes ``metrics.csv``,
    ``summary.json`` and ``dice_vs_clicks.png`` to ``output_dir`` (each atomically) and prints a table.

    Args:
        output_dir: where the files go.
        num_clicks: clicks per target.
        class_names: label value (as a string) -> name, for the table and the plot.
        settings: entries recorded in ``summary.json`` as they are (protocol, network, checkpoint...).
        failures: the run's case list (its ``failures`` are recorded).
    """

    def __init__(
        self,
        output_dir: str,
        num_clicks: int,
        class_names: Mapping[str, str] | None = None,
        settings: Mapping[str, Any] | None = None,
        failures: Any = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.num_clicks = num_clicks
        self.class_names = {str(k): str(v) for k, v in (class_names or {}).items()}
        self.settings = dict(settings or {})
        self.failures = failures
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.rows.extend(e.state.output["rows"]))
        engine.add_event_handler(Events.COMPLETED, lambda _: self.write())

    def write(self) -> dict[str, Any]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summary = dict(self.settings, num_clicks=self.num_clicks, **summarize(self.rows, self.num_clicks))
        summary["failed_cases"] = list(getattr(self.failures, "failures", []))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["case", "class", "click", "dice", "nsd", "seconds"])
        writer.writeheader()
        writer.writerows(self.rows)
        _write_atomic(self.output_dir / "metrics.csv", lambda p: Path(p).write_text(buffer.getvalue()))
        _write_atomic(self.output_dir / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
        if self.rows:
            _write_atomic(self.output_dir / "dice_vs_clicks.png", self._plot)
        table = self.table(summary)
        print(table)
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
        return "\n".join(lines)

    def _plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        by_class: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for row in self.rows:
            by_class[str(row["class"])][int(row["click"])].append(row["dice"])
            by_class["overall"][int(row["click"])].append(row["dice"])
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
