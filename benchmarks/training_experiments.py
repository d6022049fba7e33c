"""Training recipes compared at an equal CPU budget, each measured the same way (model card: "Training recipe").

    python benchmarks/training_experiments.py --name new_recipe --cpu_minutes 20 --threads 1 \
        --train_datalists "['<DATA>/hippocampus/dataset.json', '<DATA>/openkbp/dataset.json']" \
        --hippocampus <DATA>/hippocampus/dataset.json --openkbp <DATA>/openkbp/dataset.json \
        --output_dir runs/experiments [--override '{"network_name": "sam_med3d_lite_fullres_clickmaps"}']

Trains ``bundle/configs/train.json`` (overrides given as JSON; from scratch) until the process has used
``cpu_minutes`` of CPU time (process time, so that runs sharing the machine get the same compute), then measures
the last weights:

- ``bundle/configs/evaluate.json`` (uniform protocol, the run's click memory) on the first cases of each validation
  split: Dice after 1, 5 and 10 clicks, and the gain from clicks;
- prompt use on the hippocampus validation cases: the overlap between the mask from one click at the deepest point
  of the anterior part and the mask from one click at the deepest point of the posterior part (a model that
  ignores where the click is returns the same mask twice: overlap 1); and the Dice when the ground truth itself is
  given as the mask prompt with a click at its deepest point (a model that ignores the mask prompt gains nothing).

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


def _train(run_dir: Path, cpu_minutes: float, train_datalists: list[str], overrides: dict) -> dict:
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    settings = dict(
        bundle_root=str(REPO / "bundle"),
        datalist=train_datalists,
        output_dir=str(run_dir),
        epochs=10_000,
        val_interval=10_000,
        num_workers=0,
        progress_bar=False,
        pretrained_ckpt="",
        checkpoint_every_n_iterations=200,
    )
    settings.update(overrides)
    workflow = ConfigWorkflow(config_file=str(REPO / "bundle/configs/train.json"), workflow_type="train", **settings)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    losses: list[float] = []

    def budget(engine) -> None:
        output = engine.state.output
        losses.append(float((output[0] if isinstance(output, list) else output)["loss"]))
        if time.process_time() - started_cpu > cpu_minutes * 60:
            engine.terminate()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, budget)
    workflow.run()
    from custom.checkpoints import SaveLatestCheckpoint

    handler = next(
        h for h in workflow.parser.get_parsed_content("train#handlers") if isinstance(h, SaveLatestCheckpoint)
    )
    handler(trainer)  # the final weights, whatever the interval
    network = workflow.parser.get_parsed_content("network")
    network_name = workflow.parser.get_parsed_content("network_name")
    workflow.finalize()
    return {
        "iterations": trainer.state.iteration,
        "cpu_minutes_used": round((time.process_time() - started_cpu) / 60, 1),
        "wall_minutes": round((time.perf_counter() - started_wall) / 60, 1),
        "loss_first_50": round(sum(losses[:50]) / max(len(losses[:50]), 1), 3),
        "loss_last_50": round(sum(losses[-50:]) / max(len(losses[-50:]), 1), 3),
        "network_name": network_name,
    }, network


def _trained(run_dir: Path, overrides: dict) -> tuple[dict, torch.nn.Module]:
    """The network of an earlier run of this harness, with its last weights and iteration count."""
    from monai.bundle import ConfigParser

    from custom.networks import load_weights

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle/configs/train.json"))
    parser.update(overrides)
    network_name = parser.get_parsed_content("network_name")
    network = parser.get_parsed_content("network_def")
    load_weights(network, run_dir / "model_latest.pt")
    state = torch.load(run_dir / "training_state.pt", map_location="cpu", weights_only=True)
    return {"iterations": int(state["trainer"]["iteration"]), "network_name": network_name}, network


def _subset(run_dir: Path, name: str, datalist: str, max_cases: int) -> Path:
    from custom.data import read_labelled_datalist

    entries = read_labelled_datalist(datalist, "validation")[:max_cases]
    subset = run_dir / f"{name}_subset.json"
    subset.write_text(json.dumps({"modality": {"0": entries[0]["modality"]}, "validation": entries}))
    return subset


def _evaluate(run_dir: Path, name: str, subset: Path, num_clicks: int, overrides: dict) -> dict:
    from monai.bundle import ConfigWorkflow

    out = run_dir / f"eval_{name}"
    workflow = ConfigWorkflow(
        config_file=str(REPO / "bundle/configs/evaluate.json"),
        workflow_type="infer",
        bundle_root=str(REPO / "bundle"),
        datalist=str(subset),
        output_dir=str(out),
        ckpt_path=str(run_dir / "model_latest.pt"),
        num_clicks=num_clicks,
        **{"report#progress": False},
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    summary = json.loads((out / "summary.json").read_text())
    result = {f"dice@{k}": round(summary["overall"][f"dice@{k}"], 3) for k in (1, 5, 10) if k <= num_clicks}
    result["per_class_dice@1"] = {k: round(v["dice@1"], 3) for k, v in summary["per_class"].items()}
    result["per_class_dice@5"] = {k: round(v["dice@5"], 3) for k, v in summary["per_class"].items()}
    return result


def _prompt_use(network: torch.nn.Module, subset: Path, click_memory: str, spacing_mm: float) -> dict:
    """Overlap of the masks from one click on each hippocampus part; Dice with the truth as mask prompt."""
    import numpy as np
    from monai.transforms import EnsureChannelFirst, LoadImage

    from custom.predictor import VolumetricPredictor
    from custom.prompts import deepest_point

    entries = json.loads(subset.read_text())["validation"]
    load = LoadImage(image_only=True)
    network.eval()
    predictor = VolumetricPredictor(network, spacing_mm=spacing_mm, click_memory=click_memory)
    overlaps, prompted = [], []
    for entry in entries:
        image = EnsureChannelFirst()(load(entry["image"]))
        label = torch.as_tensor(np.asarray(load(entry["label"]))).round().long()
        predictor.set_image(image)
        masks = []
        for part in (1, 2):
            truth = label == part
            click = deepest_point(truth)
            masks.append(predictor.add_click(part, click.tolist(), True).clone())
            predictor.reset(part)
            predictor.set_mask(("prompted", part), truth)
            mask = predictor.add_click(("prompted", part), click.tolist(), True)
            prompted.append(2 * float((mask & truth).sum()) / float(mask.sum() + truth.sum()))
            predictor.reset(("prompted", part))
        a, b = masks
        overlaps.append(2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0))
    return {
        "overlap_anterior_vs_posterior_click": round(float(np.mean(overlaps)), 3),
        "dice_with_truth_as_mask_prompt": round(float(np.mean(prompted)), 3),
    }


def main(
    name: str,
    cpu_minutes: float,
    train_datalists: list[str],
    hippocampus: str,
    openkbp: str,
    output_dir: str = "runs/experiments",
    override: str | dict = "{}",
    threads: int = 1,
    hippocampus_cases: int = 20,
    openkbp_cases: int = 10,
    evaluate_only: bool = False,
) -> None:
    torch.set_num_threads(int(threads))
    overrides = override if isinstance(override, dict) else json.loads(override)  # fire may parse the JSON
    run_dir = Path(output_dir) / name
    result: dict = {"name": name, "override": overrides, "cpu_minutes": cpu_minutes, "threads": threads}
    if evaluate_only:  # a finished training run's last weights (its log has the budget)
        trained, network = _trained(run_dir, overrides)
    else:
        trained, network = _train(run_dir, cpu_minutes, list(train_datalists), overrides)
    result.update(trained)
    memory = overrides.get("click_memory", "all")
    network_overrides = {k: v for k, v in overrides.items() if k.startswith("network_def#")}
    evaluation = {**network_overrides, "network_name": trained["network_name"], "click_memory": memory}
    hippo = _subset(run_dir, "hippocampus", hippocampus, hippocampus_cases)
    kbp = _subset(run_dir, "openkbp", openkbp, openkbp_cases)
    result["hippocampus"] = _evaluate(run_dir, "hippocampus", hippo, 10, evaluation)
    result["openkbp"] = _evaluate(run_dir, "openkbp", kbp, 5, evaluation)
    result["prompt_use"] = _prompt_use(network, hippo, memory, 1.5)
    with open(Path(output_dir) / "experiments.jsonl", "a") as handle:
        handle.write(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    fire.Fire(main)
