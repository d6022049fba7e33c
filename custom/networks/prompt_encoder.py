"""The SAM-Med3D prompt encoder: random-Fourier positional encoding, 3D points and a low-res mask prompt.

Two quirks of the released weights are kept on purpose (reference §1):

- the encoding of coordinates ``c`` is ``cat([sin p, cos p, sin p])`` with ``p = 2 pi (2c - 1) G``: the
  sine block really is repeated;
- the dense (image) encoding of grid cell ``(i0, i1, i2)`` uses the coordinate vector
  ``((i1 + .5) / g1, (i0 + .5) / g0, (i2 + .5) / g2)``, axes 0 and 1 swapped with respect to the points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .common import LayerNorm3d

POSITIVE, NEGATIVE, PADDING = 1, 0, -1
#: labels of a box's two corners given as points (as 2D SAM does): the minimum and the maximum corner
BOX_MIN, BOX_MAX = 2, 3


class PositionEmbeddingRandom3D(nn.Module):
    """Random-Fourier features of 3D coordinates in ``[0, 1]``.

    The Gaussian matrix ``(3, num_pos_feats)`` is a persistent buffer: checkpoints carry it.
    """

    #: SAM-Med3D's quirks (module docstring); 2D SAM's encoding has neither.
    repeat_sine = True
    swap_dense_axes = True

    def __init__(self, num_pos_feats: int = 128, scale: float = 1.0, swap_dense_axes: bool | None = None) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(3, num_pos_feats))
        if swap_dense_axes is not None:  # a variant trained here may drop the released weights' swap
            self.swap_dense_axes = bool(swap_dense_axes)

    @property
    def width(self) -> int:
        """Channels of the encoding."""
        return (3 if self.repeat_sine else 2) * self.positional_encoding_gaussian_matrix.shape[1]

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """``(..., 3)`` coordinates in ``[0, 1]`` -> ``(..., width)``."""
        matrix = self.positional_encoding_gaussian_matrix
        projected = 2 * math.pi * ((2 * coords - 1).to(matrix.dtype) @ matrix)
        blocks = [projected.sin(), projected.cos()] + ([projected.sin()] if self.repeat_sine else [])
        return torch.cat(blocks, dim=-1)

    def dense(self, grid: Sequence[int]) -> torch.Tensor:
        """Encoding of every cell centre of a ``grid`` -> ``(C, g0, g1, g2)``."""
        device = self.positional_encoding_gaussian_matrix.device
        centres = [(torch.arange(s, device=device, dtype=torch.float32) + 0.5) / s for s in grid]
        c0, c1, c2 = torch.meshgrid(*centres, indexing="ij")
        order = [c1, c0, c2] if self.swap_dense_axes else [c0, c1, c2]
        return self.encode(torch.stack(order, dim=-1)).permute(3, 0, 1, 2)

    def points(self, coords: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """Voxel-centre encoding of ``(B, N, 3)`` points (array order) in an image of ``image_size`` voxels."""
        size = torch.as_tensor(image_size, dtype=torch.float32, device=coords.device)
        return self.encode((coords.float() + 0.5) / size)


class PromptEncoder3D(nn.Module):
    """Embeds point and mask prompts for the mask decoder.

    Args:
        embed_dim: prompt width ``C`` (the image embedding's channels); divisible by 3 for the default encoding.
        mask_in_chans: hidden channels of the mask down-scaling.
        pe_layer: the positional encoding (default: SAM-Med3D's, ``embed_dim / 3`` features).
        box_prompts: two more learned embeddings, added to the positional encodings of a box's minimum and
            maximum corner (points labelled ``BOX_MIN`` / ``BOX_MAX``), as 2D SAM does. The released weights
            have none: a box given to a network without them is an error, never silently ignored.
        dense_pe_axis_swap: the released weights' swap of axes 0 and 1 in the dense encoding (module docstring);
            False for variants trained here, whose click tokens then share the image's coordinate frame.
        mask_prompt_chans: channels of the dense prompt input: 1 (the previous logits) or more (for example the
            previous logits and the positive and negative click maps).
        mask_downscale_stages: stride-2 stages from the dense prompt's grid to the embedding grid (2: the
            low-res logits at 4x the embedding grid; 3 for full-resolution logits of 8^3 patches).
    """

    def __init__(
        self,
        embed_dim: int = 384,
        mask_in_chans: int = 16,
        pe_layer: PositionEmbeddingRandom3D | None = None,
        box_prompts: bool = False,
        dense_pe_axis_swap: bool = True,
        mask_prompt_chans: int = 1,
        mask_downscale_stages: int = 2,
    ) -> None:
        super().__init__()
        if pe_layer is None:
            if embed_dim % 3:
                raise ValueError(f"prompt embed_dim={embed_dim} must be divisible by 3 (sin, cos, sin blocks)")
            pe_layer = PositionEmbeddingRandom3D(embed_dim // 3, swap_dense_axes=dense_pe_axis_swap)
        if mask_downscale_stages < 2:
            raise ValueError(f"mask_downscale_stages must be >= 2, got {mask_downscale_stages}")
        if pe_layer.width != embed_dim:
            raise ValueError(f"the positional encoding is {pe_layer.width} wide, the prompts {embed_dim}")
        self.embed_dim = embed_dim
        self.pe_layer = pe_layer
        # Index = point label: 0 negative, 1 positive.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.box_prompts = box_prompts
        if box_prompts:
            self.box_corner_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))
        # upstream's two stages keep their state-dict indices; further stages (full-resolution prompts) go after them
        stages = [
            nn.Conv3d(mask_prompt_chans, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
        ]
        for _ in range(mask_downscale_stages - 2):
            stages += [
                nn.Conv3d(mask_in_chans, mask_in_chans, kernel_size=2, stride=2),
                LayerNorm3d(mask_in_chans),
                nn.GELU(),
            ]
        self.mask_prompt_chans = mask_prompt_chans
        self.mask_downscaling = nn.Sequential(*stages, nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1))
        # Never trained upstream (training always passes a mask); kept for checkpoint compatibility only.
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_pe(self, grid: Sequence[int]) -> torch.Tensor:
        """Positional encoding of the image embedding's grid: ``(1, C, g0, g1, g2)``."""
        return self.pe_layer.dense(grid).unsqueeze(0)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """Sparse prompt tokens.

        Args:
            coords: ``(B, N, 3)`` float voxel indices of the encoder's input, array order.
            labels: ``(B, N)``: 1 positive, 0 negative, -1 padding (ignored), 2 / 3 a box's minimum / maximum
                corner (networks built with ``box_prompts`` only).
            image_size: the encoder input's spatial size in voxels.

        Returns:
            ``(B, N + 1, C)``: one padding token is always appended (the released weights expect it).
        """
        b = coords.shape[0]
        coords = torch.cat([coords.float(), coords.new_zeros(b, 1, 3, dtype=torch.float32)], dim=1)
        labels = torch.cat([labels, labels.new_full((b, 1), PADDING)], dim=1)[..., None]
        tokens = self.pe_layer.points(coords, image_size)
        tokens = torch.where(labels == PADDING, self.not_a_point_embed.weight, tokens)
        tokens = tokens + (labels == NEGATIVE) * self.point_embeddings[NEGATIVE].weight
        tokens = tokens + (labels == POSITIVE) * self.point_embeddings[POSITIVE].weight
        if self.box_prompts:
            tokens = tokens + (labels == BOX_MIN) * self.box_corner_embeddings[0].weight
            tokens = tokens + (labels == BOX_MAX) * self.box_corner_embeddings[1].weight
        elif not torch.compiler.is_compiling() and bool((labels >= BOX_MIN).any()):  # a traced graph has no data
            raise ValueError(
                "this network has no box embeddings (the released weights have none): give a box as a positive "
                "click at its centre (the predictor does so), or use a variant built with box_prompts=True"
            )
        return tokens

    def embed_mask(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """``(B, mask_prompt_chans, s g0, s g1, s g2)`` (the previous logits, ``s = 2^mask_downscale_stages``, and
        any further dense prompt channels) -> dense prompt ``(B, C, g0, g1, g2)``."""
        return self.mask_downscaling(mask_logits)

    def forward(
        self,
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        mask_logits: torch.Tensor,
        image_size: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse ``(B, N + 1, C)`` (``(B, 0, C)`` without points) and dense ``(B, C, g0, g1, g2)`` prompts."""
        dense = self.embed_mask(mask_logits)
        if coords is None:
            sparse = dense.new_zeros(dense.shape[0], 0, self.embed_dim)
        else:
            sparse = self.embed_points(coords, labels, image_size)
        return sparse, dense
