"""One rank of the DDP test (run by ``torchrun`` from test_training.py): train two iterations with the
multi-GPU overlay on CPU (gloo), then save this rank's parameters before and after."""

import sys
from pathlib import Path

import torch
from monai.bundle import ConfigWorkflow

configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
output_dir = sys.argv[1]
workflow = ConfigWorkflow(
    config_file=[str(configs / "train.json"), str(configs / "multi_gpu_train.json")],
    workflow_type="train",
    output_dir=output_dir,
    network_name="sam_med3d_tiny",
    **{"network_def#image_size": 64},
    epochs=1,
    batch_size=1,
    num_workers=0,
    val_interval=100,
)
workflow.initialize()
network = workflow.parser.get_parsed_content("network")
trainer = workflow.parser.get_parsed_content("train#trainer")
initial = {k: v.detach().clone() for k, v in network.state_dict().items()}
workflow.run()
rank = torch.distributed.get_rank()
torch.save(
    {"initial": initial, "final": network.state_dict(), "iterations": trainer.state.iteration},
    Path(output_dir) / f"rank{rank}.pt",
)
workflow.finalize()
