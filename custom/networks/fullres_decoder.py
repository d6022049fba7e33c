"""A mask decoder that predicts at the crop's full resolution: SAM's two-way transformer on the ViT grid, then one
transposed-convolution stage per halving of the patch, each fused with the convolutional stem's image features of
its resolution and (optionally) the dense prompts (previous logits, click maps) pooled to it.

With the lite variants' 8^3 patches, SAM's decoder stops at 4x the ViT grid (3 mm cells at 1.5 mm); this one
reaches 8x (the 1.5 mm voxels of the window), which small structures need.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, LayerNorm3d
from .mask_decoder import MaskDecoder3D


class FullResMaskDecoder3D(MaskDecoder3D):
    """``(embedding at g, stem features at 2g .. pg, dense prompt maps at pg)`` -> logits ``(B, 1, pg, pg, pg)``.

    Args:
        transformer_dim: width ``C`` of the embedding and prompt tokens.
        transformer_heads: attention heads of the two-way transformer.
        transformer_mlp_dim: its MLP width.
        stage_chans: channels after each up-scaling stage, coarsest first (one stage per halving of the patch:
            three for 8^3 patches); the stem's features of each resolution have as many channels and are added
            as they are (the stem's last convolution is their projection, computed once per window).
        map_chans: channels of the dense prompt maps fused into every stage (0: none).
    """

    def __init__(
        self,
        transformer_dim: int = 192,
        transformer_heads: int = 8,
        transformer_mlp_dim: int = 1024,
        stage_chans: Sequence[int] = (96, 48, 16),
        map_chans: int = 0,
    ) -> None:
        super().__init__(transformer_dim, 2, transformer_heads, transformer_mlp_dim, num_multimask_outputs=0)
        self.stage_chans = tuple(int(c) for c in stage_chans)
        self.map_chans = int(map_chans)
        widths = (transformer_dim, *self.stage_chans)
        del self.output_upscaling  # SAM's two 2x stages: replaced by the stages below
        self.upscale = nn.ModuleList(
            nn.ConvTranspose3d(c_in, c_out, kernel_size=2, stride=2) for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        self.map_proj = nn.ModuleList(
            nn.Conv3d(self.map_chans, c, kernel_size=1) for c in (self.stage_chans if self.map_chans else ())
        )
        # as SAM's up-scaling: normalised between stages, not after the last (a norm at full resolution is the
        # most costly step of a click)
        self.norms = nn.ModuleList([*(LayerNorm3d(c) for c in self.stage_chans[:-1]), nn.Identity()])
        self.output_hypernetworks_mlps = nn.ModuleList([MLP(transformer_dim, transformer_dim, self.stage_chans[-1], 3)])

    def forward(  # type: ignore[override]
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt: torch.Tensor,
        dense_prompt: torch.Tensor,
        skips: Sequence[torch.Tensor] = (),
        maps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-mask prediction at full resolution.

        Args:
            image_embedding: ``(B, C, g0, g1, g2)``.
            image_pe: ``(1, C, g0, g1, g2)``.
            sparse_prompt: ``(B, N, C)`` point tokens (N may be 0).
            dense_prompt: ``(B, C, g0, g1, g2)`` the embedded dense prompt.
            skips: the stem's features, finest first, ``(B, stage_chans[-1 - i], p g / 2^i, ...)``.
            maps: ``(B, map_chans, p g0, p g1, p g2)`` dense prompt maps (with ``map_chans`` > 0).

        Returns:
            logits ``(B, 1, p g0, p g1, p g2)`` and the (untrained) IoU prediction ``(B, 1)``.
        """
        if len(skips) != len(self.upscale):
            raise ValueError(f"expected {len(self.upscale)} stem features (finest first), got {len(skips)}")
        if self.map_chans and (maps is None or maps.shape[1] != self.map_chans):
            raise ValueError(
                f"expected dense prompt maps of {self.map_chans} channels, got {getattr(maps, 'shape', None)}"
            )
        tokens_out, x = self.attend(image_embedding, image_pe, sparse_prompt, dense_prompt)
        for stage, (up, skip, norm) in enumerate(zip(self.upscale, reversed(skips), self.norms)):
            x = up(x)
            if skip.shape[1:] != x.shape[1:]:
                raise ValueError(f"stage {stage}: stem feature {tuple(skip.shape)} does not fit {tuple(x.shape)}")
            x = x + skip.to(x.dtype)
            if self.map_chans:
                pooled = F.adaptive_avg_pool3d(maps, x.shape[2:]) if maps.shape[2:] != x.shape[2:] else maps
                x = x + self.map_proj[stage](pooled.to(x.dtype))
            x = F.relu(norm(x))  # ReLU: 4x cheaper than GELU at full resolution under bf16 (measured)
        return self.predict(tokens_out, x)
