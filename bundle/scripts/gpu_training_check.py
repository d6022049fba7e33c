"""Train a variant through ``configs/train.json`` for a fixed time and print steps/s and peak memory.

    python bundle/scripts/gpu_training_check.py --network_name sam_med3d_small --seconds 180

On the shipped hippocampus sample (crops at the variant's window), bf16 autocast, batch 2; the first 5 steps
(warm-up, caches) are not timed. Runs on CPU too (slowly); it is part of ``gpu_check.sh``.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import fire

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT.parent))
sys.path.insert(0, str(BUNDLE_ROOT))


def main(network_name: str = "sam_med3d_small", seconds: float = 180.0, batch_size: int = 2) -> None:
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_ROOT / "configs" / "train.json"),
        workflow_type="train",
        bundle_root=str(BUNDLE_ROOT),
        network_name=network_name,
        pretrained_ckpt=None,
        output_dir=tempfile.mkdtemp(),
        epochs=10_000,
        val_interval=10_000,
        batch_size=batch_size,
        num_workers=2,
        progress_bar=False,
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    marks: dict[str, float] = {}

    def tick(engine) -> None:
        if engine.state.iteration == 5:
            marks["start"] = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        if "start" in marks and time.perf_counter() - marks["start"] > seconds:
            engine.terminate()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, tick)
    workflow.run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - marks["start"]
    steps = trainer.state.iteration - 5
    result = {
        "network_name": network_name,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "steps": steps,
        "steps_per_second": round(steps / elapsed, 3),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "peak_host_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    fire.Fire(main)
