"""Small building blocks shared by the SAM-Med3D encoder, prompt encoder and decoder, and the one reading of
yes/no settings (:func:`as_flag`) that builders, loaders and workflows share."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def as_flag(value: Any, name: str) -> bool:
    """A yes/no setting as a bool.

    ``python -m monai.bundle run ... --resume false`` hands over the *string* ``"false"`` (the command line
    reads only ``True``/``False`` as booleans), which is truthy: taken as given it would silently mean yes.
    Stricter than ``monai.utils.str2bool``, which also takes ``yes``/``no``/``1``/``0``/``t``/``n`` and does not
    name the setting: a typo here is refused, never read as a choice.

    Raises:
        ValueError: neither a bool nor ``"true"``/``"false"`` in any case, naming the setting.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be True or False, got {value!r}")


class LayerNorm3d(nn.Module):
    """Layer normalisation over the channel axis of a ``(B, C, D, H, W)`` tensor, per voxel.

    Args:
        num_channels: ``C``.
        eps: added to the (biased) variance.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.layer_norm over a channels-last view: one fused kernel instead of four reductions.
        x = x.movedim(1, -1)
        x = nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


class MLPBlock(nn.Module):
    """Two linear layers with an activation in between: ``dim -> mlp_dim -> dim``."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the decoder's hypernetwork and IoU head).

    State-dict keys are ``layers.{i}.weight`` / ``layers.{i}.bias`` as upstream.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x
