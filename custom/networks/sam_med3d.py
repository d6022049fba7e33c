"""SamMed3D: image encoder + prompt encoder + mask decoder, with an encode-once / decode-per-click API."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D

#: The decoder predicts at 4x the embedding grid: low-res logits are ``1 / (patch_size / 4)`` of the input.
LOW_RES_UPSCALE = 4


class SamMed3D(nn.Module):
    """Promptable 3D segmentation network (state-dict keys as upstream SAM-Med3D).

    Coordinates are float voxel indices of the encoder's input crop, in array order ``(d, h, w)``.
    With the released configuration the input is ``(B, 1, 128, 128, 128)``, the embedding
    ``(B, 384, 8, 8, 8)`` and the low-res logits ``(B, 1, 32, 32, 32)``.
    """

    def __init__(
        self, image_encoder: ImageEncoderViT3D, prompt_encoder: PromptEncoder3D, mask_decoder: MaskDecoder3D
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @property
    def patch_size(self) -> int:
        """Voxels per embedding cell along each axis."""
        return self.image_encoder.patch_size

    @property
    def img_size(self) -> int:
        """Side of the cubic crop the network was built for (voxels)."""
        return self.image_encoder.img_size

    def logits_size(self, grid: tuple[int, ...] | torch.Size) -> list[int]:
        """The spatial size of :meth:`decode`'s logits (and of its ``mask_input``) for an embedding grid."""
        return [LOW_RES_UPSCALE * g for g in grid]

    @staticmethod
    def _check_points(point_coords: torch.Tensor | None, point_labels: torch.Tensor | None) -> None:
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        if point_coords is not None and (
            point_coords.ndim != 3 or point_coords.shape[-1] != 3 or point_labels.shape != point_coords.shape[:2]
        ):
            raise ValueError(
                f"expected point_coords (B, N, 3) and point_labels (B, N), got {tuple(point_coords.shape)} "
                f"and {tuple(point_labels.shape)}"
            )

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` normalised crop -> embedding ``(B, C, D/p, H/p, W/p)``."""
        return self.image_encoder(image)

    def decode(
        self,
        embedding: torch.Tensor,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt step on a computed embedding.

        Args:
            embedding: ``(B, C, g0, g1, g2)`` from :meth:`encode`.
            point_coords: ``(B, N, 3)`` float voxel indices in the crop (array order), or None for a mask-only step.
            point_labels: ``(B, N)``: 1 positive, 0 negative, -1 padding.
            mask_input: previous low-res logits ``(B, 1, 4g0, 4g1, 4g2)``; None means zeros (the released
                weights never saw the "no mask" embedding, so it is never used).

        Returns:
            low-res logits ``(B, 1, 4g0, 4g1, 4g2)`` and predicted IoU ``(B, 1)`` (untrained upstream).
        """
        b, _, *grid = embedding.shape
        low_res_grid = self.logits_size(grid)
        self._check_points(point_coords, point_labels)
        if mask_input is None:
            mask_input = embedding.new_zeros(b, 1, *low_res_grid)
        elif tuple(mask_input.shape[2:]) != tuple(low_res_grid):
            raise ValueError(f"mask_input must be (B, 1, {low_res_grid}), got {tuple(mask_input.shape)}")
        image_size = [self.patch_size * g for g in grid]
        sparse, dense = self.prompt_encoder(point_coords, point_labels, mask_input, image_size)
        image_pe = self.prompt_encoder.dense_pe(grid).to(embedding.dtype)
        return self.mask_decoder(embedding, image_pe, sparse.to(embedding.dtype), dense)

    def forward(
        self,
        image: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode, decode one prompt step, and upsample: ``(B, 1, D, H, W)`` -> logits ``(B, 1, D, H, W)``."""
        low_res, _ = self.decode(self.encode(image), point_coords, point_labels, mask_input)
        return upsample_logits(low_res, image.shape[2:])


def mask_prompt_logits(network: nn.Module, mask: torch.Tensor, grid: Sequence[int], logit: float) -> torch.Tensor:
    """An earlier binary mask as the network's mask prompt: ``(B, 1, D, H, W)`` on the window -> logits of
    magnitude ``logit`` at the network's logits size for an embedding ``grid`` (``(B, 1, *size)``, area-averaged,
    so a partly covered cell gets a smaller logit). One definition for the predictor's ``set_mask`` and
    training's wrong earlier masks."""
    size = network.logits_size(tuple(grid)) if hasattr(network, "logits_size") else [LOW_RES_UPSCALE * g for g in grid]
    fraction = F.interpolate(mask.float(), size=list(size), mode="area")
    return (2 * fraction - 1) * logit


def upsample_logits(low_res_logits: torch.Tensor, size: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Trilinear (align_corners=False) upsampling of ``(B, 1, d, h, w)`` logits to ``size`` (unchanged if they
    already have it: full-resolution variants)."""
    if tuple(low_res_logits.shape[2:]) == tuple(size):
        return low_res_logits
    return F.interpolate(low_res_logits, size=tuple(size), mode="trilinear", align_corners=False)
