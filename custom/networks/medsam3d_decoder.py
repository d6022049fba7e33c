"""The prompt side of 3DMedSAM: a 3D prompt encoder in 2D SAM's format and a multi-scale 3D mask decoder.

Both keep the key names of 2D SAM's ``prompt_encoder.*`` and ``mask_decoder.*`` so that a segment-anything
ViT-B checkpoint initialises them (see :mod:`custom.networks.medsam3d` for how each 2D tensor is carried
to 3D). Shapes use ``g`` for the encoder's token grid, ``C = 256`` for the prompt width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PositionEmbeddingRandom3D, PromptEncoder3D


class SamPositionEmbedding3D(PositionEmbeddingRandom3D):
    """2D SAM's random-Fourier encoding (``cat[sin p, cos p]``, no repeated block) over ``(d, h, w)``.

    The Gaussian matrix is ``(3, C / 2)`` with rows in array order ``(d, h, w)``; the dense encoding of a
    cell uses the same order as the points (2D SAM has no axis swap either).
    """

    repeat_sine = False
    swap_dense_axes = False


class SamPromptEncoder3D(PromptEncoder3D):
    """3D point and mask prompts at 2D SAM's width (256): positive/negative point embeddings, the padding
    point, and a mask down-scaling ``4g -> g`` whose 2D convolutions are inflated to 3D.

    Args:
        embed_dim: prompt width ``C`` (even).
        mask_in_chans: hidden channels of the mask down-scaling (16 in 2D SAM).
    """

    def __init__(self, embed_dim: int = 256, mask_in_chans: int = 16) -> None:
        if embed_dim % 2:
            raise ValueError(f"prompt embed_dim={embed_dim} must be even (sin and cos halves)")
        super().__init__(embed_dim, mask_in_chans, pe_layer=SamPositionEmbedding3D(embed_dim // 2))


class MultiScaleMaskDecoder3D(MaskDecoder3D):
    """2D SAM's mask decoder in 3D, with encoder features of two shallower depths fused while up-scaling.

    The packed embedding is ``(B, C + s2 + s4, g0, g1, g2)``: channels ``[0, C)`` are the neck output (the
    two-way transformer's image side), the next ``s2`` a mid-depth feature fused at ``2g`` and the last
    ``s4`` a shallow feature fused at ``4g``. Each fusion is a transposed convolution whose last layer starts
    at zero, so an untrained fusion leaves 2D SAM's decoder path unchanged.

    Args:
        transformer_dim: ``C`` (256 for 2D SAM).
        transformer_heads: attention heads of the two-way transformer.
        transformer_mlp_dim: its MLP width.
        skip_chans: ``(s2, s4)``.
    """

    def __init__(
        self,
        transformer_dim: int = 256,
        transformer_heads: int = 8,
        transformer_mlp_dim: int = 2048,
        skip_chans: Sequence[int] = (64, 64),
    ) -> None:
        super().__init__(transformer_dim, 2, transformer_heads, transformer_mlp_dim)
        self.skip_chans = tuple(int(c) for c in skip_chans)
        if len(self.skip_chans) != 2:
            raise ValueError(f"skip_chans must give two widths (2x and 4x), got {skip_chans}")
        s2, s4 = self.skip_chans
        self.fuse_2x = nn.ConvTranspose3d(s2, transformer_dim // 4, kernel_size=2, stride=2)
        self.fuse_4x = nn.Sequential(
            nn.ConvTranspose3d(s4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 8, transformer_dim // 8, kernel_size=2, stride=2),
        )
        for last in (self.fuse_2x, self.fuse_4x[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt: torch.Tensor,
        dense_prompt: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-mask prediction.

        Args:
            image_embedding: packed ``(B, C + s2 + s4, g0, g1, g2)``.
            image_pe: ``(1, C, g0, g1, g2)``.
            sparse_prompt: ``(B, N, C)`` point tokens (N may be 0).
            dense_prompt: ``(B, C, g0, g1, g2)`` mask prompt.

        Returns:
            low-res logits ``(B, 1, 4g0, 4g1, 4g2)`` and predicted IoU ``(B, 1)``.
        """
        channels = image_embedding.shape[1]
        c = dense_prompt.shape[1]
        s2, s4 = self.skip_chans
        if channels != c + s2 + s4:
            raise ValueError(
                f"expected a packed embedding of {c} + {s2} + {s4} channels (neck, 2x and 4x features), "
                f"got {channels}: was it computed by this network's encode()?"
            )
        deep, mid, shallow = image_embedding.split([c, s2, s4], dim=1)
        tokens_out, src = self.attend(deep, image_pe, sparse_prompt, dense_prompt)
        up = self.output_upscaling
        x = up[2](up[1](up[0](src))) + self.fuse_2x(mid)
        x = up[4](up[3](x) + self.fuse_4x(shallow))
        return self.predict(tokens_out, x)
