"""Train through ``configs/train.json`` for a wall-clock budget: the shipped model's recipe on a lent GPU.

    python bundle/scripts/train_for.py --seconds 440 --output_dir runs/gpu \
        --datalist "['data/hippocampus/dataset.json', 'data/openkbp/dataset.json']" --batch_size 16 --num_workers 12

Any other ``--key value`` overrides ``train.json`` as ``monai.bundle run`` would. What differs from a plain run, and
why a fixed epoch count does not do: on a machine lent for minutes the speed is unknown beforehand, so after
``calibration_iterations`` the cosine schedule's length and the epoch count are fitted to the time left (about
``1 - validation_share`` of it for training); validation runs at the first epoch end after every
``validate_every_s`` seconds and once at the end (``SaveBestModel`` keeps ``model.pt`` on the key metric as in
``train.json``); the per-epoch training state is not written (a short epoch would write it every few seconds).
Every validation row also says where an iteration's time went so far, from Ignite's ``HandlersTimeProfiler``: waiting
for the batch (``data_s_per_iteration``) out of the whole iteration (``iteration_s``: the step and the per-iteration
handlers; on a GPU the step's queued work ends at the loss read of the iteration handler, so it is counted there); a
lent GPU that waits on the data loader shows it here.

Writes into ``output_dir``: ``model.pt`` (best validation), ``model.json``, ``model_final.pt`` (the last weights,
training format) and ``history.json`` (every validation: metrics, iteration, seconds, learning rate).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fire

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT.parent))

# handlers that a time-boxed run replaces: per-epoch state (100 MB each), per-iteration loss lines
_REPLACED_HANDLERS = ("custom.checkpoints.SaveLatestCheckpoint", "StatsHandler", "TensorBoardStatsHandler")
# the events whose handlers run once per iteration (their time belongs to the iteration's)
_PER_ITERATION_EVENTS = ("GET_BATCH_STARTED", "GET_BATCH_COMPLETED", "ITERATION_STARTED", "ITERATION_COMPLETED")


def train_for(
    seconds: float,
    output_dir: str = "runs/train_for",
    calibration_iterations: int = 30,
    validate_every_s: float = 75.0,
    validation_share: float = 0.18,
    iterations: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    **overrides,
) -> list[dict]:
    """Train for ``seconds`` of ``clock`` (setup included; the final validation comes after) and return the
    validation history. ``iterations`` fixes the schedule's length instead of fitting it to the time (to repeat an
    earlier run's schedule, as its log's "N iterations" line gives it, at an equal budget on a busier machine)."""
    from ignite.engine import Events
    from ignite.handlers import HandlersTimeProfiler
    from monai.bundle import ConfigParser

    from custom.files import write_text_atomic
    from custom.networks.checkpoint import checkpoint_payload, save_atomic

    start = clock()
    if (
        seconds <= 0
        or calibration_iterations < 1
        or not 0 <= validation_share < 1
        or (iterations is not None and iterations < 1)
    ):
        raise ValueError(
            "need seconds > 0, calibration_iterations >= 1, 0 <= validation_share < 1 and iterations >= 1 (or None); "
            f"got {seconds}, {calibration_iterations}, {validation_share}, {iterations}"
        )
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser.read_meta(str(BUNDLE_ROOT / "configs" / "metadata.json"))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    for key, value in overrides.items():
        parser[key] = value
    parser["output_dir"] = str(output_dir)
    parser["epochs"] = 10**6  # fitted after calibration
    parser["val_interval"] = 10**6  # validation is on time, below
    for handler in parser["train#handlers"]:
        if handler["_target_"] in _REPLACED_HANDLERS:
            handler["_disabled_"] = True
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    scheduler = parser.get_parsed_content("lr_scheduler")
    network = parser.get_parsed_content("network")
    out = Path(output_dir)
    logger = logging.getLogger("train_for")
    history: list[dict] = []
    progress = {"timed_from": None, "last_validation": None, "losses": []}
    profiler = HandlersTimeProfiler()
    profiler.attach(trainer)

    def time_split(iterations: int) -> dict:
        """Seconds per iteration so far: waiting for the batch, and the whole iteration (profiler rows are
        ``[name, event, total, min, max, mean, std]``; totals are "not triggered" for what never ran)."""
        rows = profiler.get_results()
        totals = {row[0]: row[2] for row in rows if row[0] in ("Processing", "Dataflow")}
        handlers = [row[2] for row in rows if row[1] in _PER_ITERATION_EVENTS]
        if iterations < 1 or not isinstance(totals["Processing"], float):
            return {}
        data = totals["Dataflow"] if isinstance(totals["Dataflow"], float) else 0.0
        whole = totals["Processing"] + data + sum(t for t in handlers if isinstance(t, float))
        return {"data_s_per_iteration": round(data / iterations, 4), "iteration_s": round(whole / iterations, 4)}

    def validate(engine) -> None:
        began = clock()
        evaluator.run(engine.state.epoch)
        row = {k: float(v) for k, v in evaluator.state.metrics.items()}
        row.update(
            epoch=engine.state.epoch,
            iteration=engine.state.iteration,
            seconds=round(clock() - start, 1),
            validation_seconds=round(clock() - began, 1),
            lr=scheduler.get_last_lr()[0],
            **time_split(engine.state.iteration),
        )
        history.append(row)
        logger.info(f"validation {json.dumps(row)}")
        write_text_atomic(out / "history.json", json.dumps(history, indent=1))
        progress["last_validation"] = clock()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _on_iteration(engine) -> None:
        iteration, output = engine.state.iteration, engine.state.output
        progress["losses"].append(float((output[0] if isinstance(output, list) else output)["loss"]))
        if iteration == 2:  # the first iterations pay for workers and caches
            progress["timed_from"] = progress["last_validation"] = clock()
        if iteration % 50 == 0:
            recent = progress["losses"][-50:]
            logger.info(
                f"iteration {iteration} epoch {engine.state.epoch} loss {sum(recent) / len(recent):.4f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} {clock() - start:.0f} s"
            )
        if iteration == 2 + calibration_iterations:
            per_iteration = (clock() - progress["timed_from"]) / calibration_iterations
            left = seconds - (clock() - start)
            total = iterations or iteration + max(1, int(left / per_iteration * (1 - validation_share)))
            scheduler.t_total = total
            engine.state.max_epochs = max(engine.state.epoch, math.ceil(total / engine.state.epoch_length))
            logger.info(f"{per_iteration:.3f} s per iteration: {total} iterations, {engine.state.max_epochs} epochs")
        if clock() - start > seconds:
            logger.info(f"time budget of {seconds} s reached at iteration {iteration}")
            engine.terminate()

    @trainer.on(Events.EPOCH_COMPLETED)
    def _on_epoch(engine) -> None:
        if progress["last_validation"] is not None and clock() - progress["last_validation"] > validate_every_s:
            validate(engine)

    trainer.run()
    validate(trainer)
    save_atomic(checkpoint_payload(network), out / "model_final.pt")
    logger.info(f"done in {clock() - start:.0f} s: {out / 'model.pt'} (best), {out / 'model_final.pt'} (last)")
    return history


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    fire.Fire(train_for)
