"""The SAM-Med3D mask decoder: two-way transformer, 4x up-scaling and hypernetwork mask heads.

Only mask token 0 (the single-mask output) was ever trained upstream; tokens 1-3 and the IoU head are
kept so the released checkpoints load strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm3d
from .transformer import TwoWayTransformer


class MaskDecoder3D(nn.Module):
    """Predicts low-res mask logits at 4x the embedding grid from an image embedding and prompt tokens.

    Args:
        transformer_dim: width ``C`` of the embedding and of the prompt tokens.
        transformer_depth: two-way blocks.
        transformer_heads: attention heads.
        transformer_mlp_dim: hidden width of the blocks' MLP.
        num_multimask_outputs: extra mask tokens (3 upstream; untrained).
        iou_head_depth: layers of the IoU head.
        iou_head_hidden_dim: hidden width of the IoU head.
    """

    def __init__(
        self,
        transformer_dim: int = 384,
        transformer_depth: int = 2,
        transformer_heads: int = 8,
        transformer_mlp_dim: int = 2048,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        if transformer_dim % 8:
            raise ValueError(f"transformer_dim={transformer_dim} must be divisible by 8 (4x up-scaling widths)")
        self.transformer = TwoWayTransformer(transformer_depth, transformer_dim, transformer_heads, transformer_mlp_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt: torch.Tensor,
        dense_prompt: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-mask prediction.

        Args:
            image_embedding: ``(B, C, g0, g1, g2)``.
            image_pe: ``(1, C, g0, g1, g2)`` dense positional encoding.
            sparse_prompt: ``(B, N, C)`` point tokens (N may be 0).
            dense_prompt: ``(B, C, g0, g1, g2)`` mask prompt.

        Returns:
            low-res logits ``(B, 1, 4g0, 4g1, 4g2)`` and predicted IoU ``(B, 1)``.
        """
        tokens_out, src = self.attend(image_embedding, image_pe, sparse_prompt, dense_prompt)
        return self.predict(tokens_out, self.output_upscaling(src))

    def attend(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt: torch.Tensor,
        dense_prompt: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer: output tokens ``(B, 1 + masks + N, C)`` and the attended image
        ``(B, C, g0, g1, g2)`` (arguments as in :meth:`forward`)."""
        b, c, *grid = image_embedding.shape
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(b, -1, -1).to(sparse_prompt.dtype), sparse_prompt], dim=1)
        pos = image_pe.expand(b, -1, -1, -1, -1)
        tokens_out, src = self.transformer(image_embedding + dense_prompt, pos, tokens)
        return tokens_out, src.transpose(1, 2).reshape(b, c, *grid)

    def predict(self, tokens_out: torch.Tensor, upscaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask token 0's hypernetwork applied to the up-scaled image ``(B, C / 8, 4g0, 4g1, 4g2)``: low-res
        logits ``(B, 1, 4g0, 4g1, 4g2)`` and the IoU prediction ``(B, 1)``."""
        hyper = self.output_hypernetworks_mlps[0](tokens_out[:, 1])
        masks = torch.einsum("bc,bcdhw->bdhw", hyper, upscaled).unsqueeze(1)
        iou = self.iou_prediction_head(tokens_out[:, 0])[:, :1]
        return masks, iou
