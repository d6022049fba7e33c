"""A small convolutional stem: image features at the crop's full resolution and at each halving down to twice the
ViT's patch grid, the skips of the full-resolution decoder.

The ViT sees the crop in patches (8^3 voxels for the lite variants); boundaries finer than a patch come from these
features. They depend on the image only, so they are computed once per window with the ViT embedding and cached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .common import LayerNorm3d


def _conv_block(in_chans: int, out_chans: int, stride: int) -> list[nn.Module]:
    kernel = 2 if stride == 2 else 3
    return [
        nn.Conv3d(in_chans, out_chans, kernel_size=kernel, stride=stride, padding=0 if stride == 2 else 1),
        LayerNorm3d(out_chans),
        nn.ReLU(inplace=True),
    ]


class ConvStem3D(nn.Module):
    """``(B, in_chans, D, H, W)`` -> features at ``D``, ``D/2``, ... (finest first).

    Level 0: a 3^3 convolution to ``chans[0] // 2`` and one to ``chans[0]`` at full resolution. Each further level:
    a stride-2 2^3 convolution then a 3^3 convolution, to ``chans[i]`` channels.

    Args:
        chans: channels per level, finest first, e.g. ``(16, 32, 64)`` for 64^3, 32^3 and 16^3 features.
        in_chans: image channels.
    """

    def __init__(self, chans: Sequence[int] = (16, 32, 64), in_chans: int = 1) -> None:
        super().__init__()
        self.chans = tuple(int(c) for c in chans)
        levels = [
            nn.Sequential(
                *_conv_block(in_chans, self.chans[0] // 2, 1), *_conv_block(self.chans[0] // 2, self.chans[0], 1)
            )
        ]
        for previous, current in zip(self.chans[:-1], self.chans[1:]):
            levels.append(nn.Sequential(*_conv_block(previous, current, 2), *_conv_block(current, current, 1)))
        self.levels = nn.ModuleList(levels)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The features of every level, finest first: ``(B, chans[i], D / 2^i, H / 2^i, W / 2^i)``."""
        features, x = [], image
        for level in self.levels:
            x = level(x)
            features.append(x)
        return tuple(features)
