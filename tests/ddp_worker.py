"""One rank of the DDP tests (run by ``torchrun`` from test_training.py): train with the multi-GPU overlay on CPU
(gloo), then save this rank's parameters (before and after), optimizer state and last validation metrics.

Usage: ``ddp_worker.py OUTPUT_DIR '{"override": value, ...}'``.
"""

import json
import sys
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
output_dir, overrides = sys.argv[1], json.loads(sys.argv[2])
workflow = ConfigWorkflow(
    config_file=[str(configs / "train.json"), str(configs / "multi_gpu_train.json")],
    workflow_type="train",
    output_dir=output_dir,
    **overrides,
)
workflow.initialize()
network = workflow.parser.get_parsed_content("network")
trainer = workflow.parser.get_parsed_content("train#trainer")
evaluator = workflow.parser.get_parsed_content("validate#evaluator")
initial = {k: v.detach().clone() for k, v in network.state_dict().items()}
metrics = []
evaluator.add_event_handler(Events.COMPLETED, lambda e: metrics.append(dict(e.state.metrics)))
workflow.run()
rank = torch.distributed.get_rank()
torch.save(
    {
        "initial": initial,
        "final": network.state_dict(),
        "requires_grad": {n: p.requires_grad for n, p in network.named_parameters()},
        "iterations": trainer.state.iteration,
        "metrics": metrics,
        "validated_items": evaluator.state.iteration,
    },
    Path(output_dir) / f"rank{rank}.pt",
)
workflow.finalize()
