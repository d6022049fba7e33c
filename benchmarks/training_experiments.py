"""Short training experiments at an equal time budget, each measured the same way (issue: clicks that help).

    python benchmarks/training_experiments.py --name baseline --minutes 12 \
        --train_datalists "['/data/hippocampus/dataset.json', '/data/openkbp/dataset.json']" \
        --hippocampus /data/hippocampus/dataset.json --openkbp /data/openkbp/dataset.json \
        --output_dir runs/experiments [--override '{"train#interactive_network#click_memory": "all"}']

Trains ``bundle/configs/train.json`` (overrides given as JSON) for a wall-clock budget, then measures:
- Dice per step through the training path itself (``InteractiveSegmentation`` in eval mode, the trained
  weights, fixed training samples): do the corrections of the training loop help?
- ``bundle/configs/evaluate.json`` on the first cases of each validation split (uniform protocol, 5 clicks):
  Dice@1 and Dice@5 on data the run never saw.
One JSON line per experiment is appended to ``<output_dir>/experiments.jsonl``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import fire
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _train(run_dir: Path, minutes: float, train_datalists: list[str], overrides: dict) -> dict:
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(REPO / "bundle/configs/train.json"),
        workflow_type="train",
        bundle_root=str(REPO / "bundle"),
        datalist=train_datalists,
        output_dir=str(run_dir),
        epochs=10_000,
        val_interval=10_000,
        num_workers=0,
        progress_bar=False,
        checkpoint_every_n_iterations=200,
        **overrides,
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    started = time.perf_counter()
    losses: list[float] = []

    def budget(engine) -> None:
        output = engine.state.output
        losses.append(float((output[0] if isinstance(output, list) else output)["loss"]))
        if time.perf_counter() - started > minutes * 60:
            engine.terminate()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, budget)
    workflow.run()
    from custom.engines import SaveLatestCheckpoint

    handler = next(
        h for h in workflow.parser.get_parsed_content("train#handlers") if isinstance(h, SaveLatestCheckpoint)
    )
    handler(trainer)  # the final weights, whatever the interval
    interactive = workflow.parser.get_parsed_content("train#interactive_network")
    dataset = workflow.parser.get_parsed_content("train#dataset")
    per_step = _dice_per_step(interactive, dataset)
    workflow.finalize()
    return {
        "iterations": trainer.state.iteration,
        "train_minutes": round((time.perf_counter() - started) / 60, 1),
        "loss_first_50": round(sum(losses[:50]) / max(len(losses[:50]), 1), 3),
        "loss_last_50": round(sum(losses[-50:]) / max(len(losses[-50:]), 1), 3),
        "train_dice_per_step": per_step,
    }


def _dice_per_step(interactive: torch.nn.Module, dataset, samples: int = 24) -> list[float]:
    """Mean Dice after each decoder step of the training loop on fixed training samples (eval mode)."""
    interactive.eval()
    dice = None
    indices = torch.linspace(0, len(dataset) - 1, samples).round().long().tolist()
    with torch.no_grad():
        for n, index in enumerate(indices):
            item = dataset[(1_000 + n, index)]
            image, target = item["image"][None], item["label"][None]
            steps = interactive(image, target, torch.Generator().manual_seed(n))
            truth = target[:, 0] > 0.5
            scores = []
            for logits in steps:
                predicted = logits[:, 0] > 0
                scores.append((2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()).clamp(min=1)).item())
            dice = scores if dice is None else [a + b for a, b in zip(dice, scores)]
    return [round(d / len(indices), 3) for d in dice]


def _evaluate(run_dir: Path, name: str, datalist: str, max_cases: int, click_memory: str, overrides: dict) -> dict:
    from monai.bundle import ConfigWorkflow

    from custom.data import read_labelled_datalist

    entries = read_labelled_datalist(datalist, "validation")[:max_cases]
    subset = run_dir / f"{name}_subset.json"
    subset.write_text(json.dumps({"modality": {"0": entries[0]["modality"]}, "validation": entries}))
    out = run_dir / f"eval_{name}"
    workflow = ConfigWorkflow(
        config_file=str(REPO / "bundle/configs/evaluate.json"),
        workflow_type="infer",
        bundle_root=str(REPO / "bundle"),
        datalist=str(subset),
        output_dir=str(out),
        ckpt_path=str(run_dir / "model_latest.pt"),
        num_clicks=5,
        click_memory=click_memory,
        **{"report#progress": False},
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    summary = json.loads((out / "summary.json").read_text())
    per_class = {k: round(v["dice@1"], 3) for k, v in summary["per_class"].items()}
    return {
        "dice@1": round(summary["overall"]["dice@1"], 3),
        "dice@5": round(summary["overall"]["dice@5"], 3),
        "per_class_dice@1": per_class,
        "per_class_dice@5": {k: round(v["dice@5"], 3) for k, v in summary["per_class"].items()},
    }


def main(
    name: str,
    minutes: float,
    train_datalists: list[str],
    hippocampus: str,
    openkbp: str,
    output_dir: str = "runs/experiments",
    override: str | dict = "{}",
    eval_override: str | dict = "{}",
    hippocampus_cases: int = 20,
    openkbp_cases: int = 10,
) -> None:
    torch.set_num_threads(2)
    # fire gives a JSON argument already parsed
    overrides, eval_overrides = (v if isinstance(v, dict) else json.loads(v) for v in (override, eval_override))
    run_dir = Path(output_dir) / name
    result = {"name": name, "override": overrides, "minutes": minutes}
    result.update(_train(run_dir, minutes, list(train_datalists), overrides))
    memory = overrides.get("train#interactive_network#click_memory", "newest")
    network = {k: v for k, v in overrides.items() if k.startswith("network")}
    for split, datalist, cases in (
        ("hippocampus", hippocampus, hippocampus_cases),
        ("openkbp", openkbp, openkbp_cases),
    ):
        result[split] = _evaluate(run_dir, split, datalist, cases, memory, {**network, **eval_overrides})
    with open(Path(output_dir) / "experiments.jsonl", "a") as handle:
        handle.write(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    fire.Fire(main)
