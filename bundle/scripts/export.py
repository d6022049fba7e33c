"""Export a checkpoint's network in two halves, encode (once per window) and one prompt step (once per click).

    python bundle/scripts/export.py --ckpt_path bundle/models/model.pt --network_name sam_med3d_lite \
        --output_dir exported                   # torch.export programs: encode.pt2, prompt_step.pt2
    python bundle/scripts/export.py ... --format onnx   # encode.onnx, prompt_step.onnx (onnxruntime, CPU)

ONNX needs the optional packages ``onnx``, ``onnxscript`` (export) and ``onnxruntime`` (running it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT.parent))
sys.path.insert(0, str(BUNDLE_ROOT))

from custom.networks import build_sam_med3d, load_weights  # noqa: E402
from custom.networks.export import export_network, export_onnx, save_programs  # noqa: E402


def export(ckpt_path: str, network_name: str, output_dir: str = "exported", max_points: int = 64, format: str = "pt2"):
    """Load ``ckpt_path`` into ``network_name`` and write the two halves to ``output_dir`` (``format``: ``"pt2"``
    or ``"onnx"``)."""
    network = build_sam_med3d(network_name)
    load_weights(network, ckpt_path)
    if format == "onnx":
        paths = export_onnx(network, output_dir, max_points=max_points)
    elif format == "pt2":
        paths = save_programs(*export_network(network, max_points=max_points), output_dir)
    else:
        raise ValueError(f"format must be 'pt2' or 'onnx', got {format!r}")
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    fire.Fire(export)
