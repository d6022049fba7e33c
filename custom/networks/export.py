"""``torch.export`` programs of the two halves of a promptable network: encode (once per crop) and one
prompt step (prompt encoder + mask decoder, once per click). TorchScript is deprecated in this torch."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..files import write_atomic
from .sam_med3d_fullres import ImageFeatures


class EncodeStep(nn.Module):
    """``(1, 1, D, H, W)`` normalised crop -> embedding ``(1, C, D/p, H/p, W/p)``; for full-resolution variants the
    tuple ``(embedding, *skips)`` of their :class:`~custom.networks.sam_med3d_fullres.ImageFeatures`."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        features = self.network.encode(image)
        return (features.embedding, *features.skips) if isinstance(features, ImageFeatures) else features


class PromptStep(nn.Module):
    """Embedding, clicks ``(1, N, 3)`` / ``(1, N)``, the previous logits (and, for full-resolution variants, the
    stem's features, finest first) -> (logits, iou).

    The first click passes zeros as previous logits (what ``decode(..., mask_input=None)`` does)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(
        self, embedding, point_coords, point_labels, mask_input, skips: tuple[torch.Tensor, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features = ImageFeatures(embedding, tuple(skips)) if skips else embedding
        return self.network.decode(features, point_coords, point_labels, mask_input)


def _example_inputs(network: nn.Module, size: int) -> tuple[torch.Tensor, tuple, tuple]:
    """A crop, the encode step's outputs, and the prompt step's example arguments (two clicks, zero logits)."""
    image = torch.zeros(1, 1, size, size, size)
    with torch.no_grad():
        features = network.encode(image)
    embedding, skips = (features.embedding, features.skips) if isinstance(features, ImageFeatures) else (features, ())
    grid = tuple(embedding.shape[2:])
    logits_size = network.logits_size(grid) if hasattr(network, "logits_size") else [4 * g for g in grid]
    previous = torch.zeros(1, 1, *logits_size)
    clicks, labels = torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.long)
    return image, (embedding, *skips), (embedding, clicks, labels, previous, tuple(skips))


def export_network(
    network: nn.Module, image_size: int | None = None, max_points: int = 64
) -> tuple[torch.export.ExportedProgram, torch.export.ExportedProgram]:
    """Export the encode and prompt steps of ``network`` (in eval mode) for a cubic crop of ``image_size``
    (default: the network's), with the number of clicks dynamic up to ``max_points``."""
    network = network.eval()
    image, _, prompt_args = _example_inputs(network, int(image_size or network.img_size))
    skips = prompt_args[-1]
    num_points = torch.export.Dim("num_points", min=1, max=max_points)
    dynamic = {"embedding": None, "point_coords": {1: num_points}, "point_labels": {1: num_points}, "mask_input": None}
    encode = torch.export.export(EncodeStep(network), (image,))
    prompt = torch.export.export(
        PromptStep(network),
        prompt_args if skips else prompt_args[:-1],
        dynamic_shapes=dynamic | ({"skips": (None,) * len(skips)} if skips else {}),
    )
    return encode, prompt


def save_programs(encode, prompt, output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``encode.pt2`` and ``prompt_step.pt2`` (``torch.export.save``; load with ``torch.export.load``)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = output_dir / "encode.pt2", output_dir / "prompt_step.pt2"
    for program, path in zip((encode, prompt), paths):
        write_atomic(path, lambda tmp, program=program: torch.export.save(program, tmp))
    return paths


def export_onnx(
    network: nn.Module, output_dir: str | os.PathLike, image_size: int | None = None, max_points: int = 64
) -> tuple[Path, Path]:
    """Write ``encode.onnx`` and ``prompt_step.onnx`` (``torch.onnx.export`` with the dynamo exporter), for
    onnxruntime on a CPU: the inputs and outputs of :class:`EncodeStep` and :class:`PromptStep`, the number of
    clicks dynamic up to ``max_points``."""
    network = network.eval()
    image, _, prompt_args = _example_inputs(network, int(image_size or network.img_size))
    skips = prompt_args[-1]
    num_points = torch.export.Dim("num_points", min=1, max=max_points)
    output_dir = Path(output_dir)
    paths = output_dir / "encode.onnx", output_dir / "prompt_step.onnx"
    skip_names = [f"skip_{i}" for i in range(len(skips))]
    specs = (
        (EncodeStep(network), (image,), None, ["image"], ["embedding", *skip_names]),
        (
            PromptStep(network),
            prompt_args if skips else prompt_args[:-1],
            {"embedding": None, "point_coords": {1: num_points}, "point_labels": {1: num_points}, "mask_input": None}
            | ({"skips": (None,) * len(skips)} if skips else {}),
            ["embedding", "point_coords", "point_labels", "mask_input", *skip_names],
            ["low_res_logits", "iou"],
        ),
    )
    for (module, args, dynamic, inputs, outputs), path in zip(specs, paths):

        def write(tmp: str, module=module, args=args, dynamic=dynamic, inputs=inputs, outputs=outputs) -> None:
            program = torch.onnx.export(
                module, args, dynamo=True, dynamic_shapes=dynamic, input_names=inputs, output_names=outputs
            )
            program.save(tmp)

        write_atomic(path, write)
    return paths
