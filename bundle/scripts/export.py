"""Export a checkpoint's network as two ``torch.export`` programs: ``encode.pt2`` and ``prompt_step.pt2``.

    python bundle/scripts/export.py --ckpt_path bundle/models/model.pt --network_name sam_med3d_lite \
        --output_dir exported
"""

from __future__ import annotations

import fire

from custom.networks import build_sam_med3d, load_checkpoint
from custom.networks.export import export_network, save_programs


def export(ckpt_path: str, network_name: str, output_dir: str = "exported", max_points: int = 64) -> None:
    """Load ``ckpt_path`` into ``network_name`` and write the two programs to ``output_dir``."""
    network = build_sam_med3d(network_name)
    load_checkpoint(network, ckpt_path)
    encode, prompt = export_network(network, max_points=max_points)
    for path in save_programs(encode, prompt, output_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    fire.Fire(export)
