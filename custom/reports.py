"""The evaluation's reports: per-click rows written to ``metrics.csv`` as each target finishes (a rerun continues
from them), the summaries (per-click Dice / NSD, NoC, the CVPR 2025 challenge's AUC and final scores), the
printed table and the Dice-vs-clicks plot."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Events

from .files import append_line_durably, write_atomic, write_text_atomic
from .networks.common import as_flag

logger = logging.getLogger(__name__)

FIELDS = ("case", "class", "click", "point", "positive", "dice", "nsd", "seconds", "case_seconds")


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

    def _block(
        self, title: str, per_class: Mapping[str, Any], total: str, overall: Mapping[str, Any], count: str, keys
    ) -> list[str]:
        """A table's header, a row per class, and the ``total`` row (``overall``'s scores, its ``count``)."""
        rows = [(self._name(label), scores["targets"], scores) for label, scores in per_class.items()]
        lines = [f"{title:<20}{'n':>5}" + "".join(f"{k:>10}" for k in keys)]
        for name, n, scores in [*rows, (total, overall[count], overall)]:
            lines.append(f"{name:<20}{n:>5}" + "".join(f"{scores[k]:>10.3f}" for k in keys))
        return lines

    def table(self, summary: Mapping[str, Any]) -> str:
        keys = [
            k for k in ("dice@1", "dice@3", "dice@5", "dice@10", "nsd@1", "nsd@5", "NoC@85") if k in summary["overall"]
        ]
        lines = self._block("target", summary["per_class"], "overall", summary["overall"], "targets", keys)
        challenge = summary.get("cvpr25")
        if challenge and challenge["overall"].get("cases"):
            names = ("DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final")
            lines += self._block("CVPR25", challenge["per_class"], "cases", challenge["overall"], "cases", names)
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
