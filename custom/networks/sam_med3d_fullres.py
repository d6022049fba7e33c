"""SAM-Med3D with full-resolution masks: the ViT encoder plus a convolutional stem (image features cached per
window), point tokens plus dense prompts (previous logits and, optionally, click maps) at the window's resolution,
and a decoder that predicts at that resolution (:class:`FullResMaskDecoder3D`).

``encode`` returns :class:`ImageFeatures` (everything that depends on the image only); ``decode`` runs the prompt
path and the decoder, so a further click costs no encoder work. Coordinates are float voxel indices of the crop in
array order, as for :class:`~custom.networks.SamMed3D`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .click_maps import clear_negative_cells, render_click_maps
from .conv_stem import ConvStem3D
from .fullres_decoder import FullResMaskDecoder3D
from .image_encoder import ImageEncoderViT3D
from .prompt_encoder import PromptEncoder3D
from .sam_med3d import SamMed3D


class ImageFeatures(NamedTuple):
    """What :meth:`SamMed3DFullRes.encode` computes once per window."""

    embedding: torch.Tensor  # (B, C, g0, g1, g2): the ViT's, after its neck
    skips: tuple[torch.Tensor, ...]  # the stem's, finest first: (B, c_i, p g / 2^i, ...)

    @property
    def shape(self) -> torch.Size:
        """The embedding's shape (what code written for a plain embedding reads)."""
        return self.embedding.shape

    def to(self, *args, **kwargs) -> ImageFeatures:
        return ImageFeatures(self.embedding.to(*args, **kwargs), tuple(s.to(*args, **kwargs) for s in self.skips))


class SamMed3DFullRes(SamMed3D):
    """Promptable 3D segmentation at the crop's resolution (see the module docstring).

    Args:
        image_encoder: the ViT.
        prompt_encoder: point tokens and the dense prompt's embedding (``mask_prompt_chans`` = 1, or 3 with click
            maps; ``mask_downscale_stages`` = log2 of the patch size).
        mask_decoder: the full-resolution decoder (``map_chans`` = the dense prompt's channels, or 0).
        stem: the convolutional stem (one level per decoder stage, finest first, each as wide as its stage).
        click_maps: give clicks also as dense maps (positive, negative) beside the previous logits.
        click_map_sigma: the maps' Gaussian standard deviation in voxels.
        negative_clicks_clear: in the previous logits, the cells of negative clicks (voxels nearer to a negative
            click than to every positive click) lose their "yes" (``min(x, 0)``) before the dense prompt sees them
            (:func:`~custom.networks.click_maps.clear_negative_cells`).
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT3D,
        prompt_encoder: PromptEncoder3D,
        mask_decoder: FullResMaskDecoder3D,
        stem: ConvStem3D,
        click_maps: bool = True,
        click_map_sigma: float = 2.0,
        negative_clicks_clear: bool = False,
    ) -> None:
        super().__init__(image_encoder, prompt_encoder, mask_decoder)
        self.negative_clicks_clear = bool(negative_clicks_clear)
        self.stem = stem
        self.click_maps = bool(click_maps)
        self.click_map_sigma = float(click_map_sigma)
        expected = 3 if self.click_maps else 1
        if prompt_encoder.mask_prompt_chans != expected:
            raise ValueError(f"click_maps={click_maps} needs a prompt encoder of {expected} dense prompt channels")

    def logits_size(self, grid: tuple[int, ...] | torch.Size) -> list[int]:
        """The logits' spatial size for an embedding grid: the crop's own."""
        return [self.patch_size * g for g in grid]

    def encode(self, image: torch.Tensor) -> ImageFeatures:  # type: ignore[override]
        """``(B, 1, D, H, W)`` normalised crop -> :class:`ImageFeatures`."""
        return ImageFeatures(self.image_encoder(image), self.stem(image))

    def dense_prompt_input(
        self, point_coords: torch.Tensor | None, point_labels: torch.Tensor | None, mask_input: torch.Tensor
    ) -> torch.Tensor:
        """The dense prompt's channels: the previous logits ``(B, 1, D, H, W)``, then (with ``click_maps``) the
        positive and negative click maps."""
        if self.negative_clicks_clear:
            mask_input = clear_negative_cells(mask_input, point_coords, point_labels)
        if not self.click_maps:
            return mask_input
        if point_coords is None:
            maps = mask_input.new_zeros(mask_input.shape[0], 2, *mask_input.shape[2:])
        else:
            maps = render_click_maps(point_coords, point_labels, mask_input.shape[2:], self.click_map_sigma)
        return torch.cat([mask_input, maps.to(mask_input.dtype)], dim=1)

    def decode(  # type: ignore[override]
        self,
        features: ImageFeatures,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt step on computed features.

        Args:
            features: from :meth:`encode`.
            point_coords: ``(B, N, 3)`` float voxel indices in the crop, or None for a mask-only step.
            point_labels: ``(B, N)``: 1 positive, 0 negative, -1 padding.
            mask_input: previous logits ``(B, 1, D, H, W)`` at the crop's resolution; None means zeros.

        Returns:
            logits ``(B, 1, D, H, W)`` and the (untrained) IoU prediction ``(B, 1)``.
        """
        embedding, skips = features
        b, _, *grid = embedding.shape
        size = self.logits_size(grid)
        self._check_points(point_coords, point_labels)
        if mask_input is None:
            mask_input = embedding.new_zeros(b, 1, *size, dtype=torch.float32)
        elif tuple(mask_input.shape[1:]) != (1, *size):
            raise ValueError(f"mask_input must be (B, 1, {size}), got {tuple(mask_input.shape)}")
        dense_input = self.dense_prompt_input(point_coords, point_labels, mask_input.float())
        sparse, dense = self.prompt_encoder(point_coords, point_labels, dense_input, size)
        image_pe = self.prompt_encoder.dense_pe(grid).to(embedding.dtype)
        maps = dense_input if self.mask_decoder.map_chans else None
        return self.mask_decoder(embedding, image_pe, sparse.to(embedding.dtype), dense, skips, maps)


def build_sam_fullres(
    image_size: int,
    patch_size: int,
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: tuple[int, ...],
    window_size: int,
    prompt_embed_dim: int,
    decoder_heads: int,
    decoder_mlp_dim: int,
    mask_in_chans: int,
    rel_pos_bias: str,
    dense_pe_axis_swap: bool = False,
    decoder_chans: tuple[int, ...] = (96, 48, 16),
    click_maps: bool = True,
    click_map_sigma: float = 2.0,
    negative_clicks_clear: bool = False,
    box_prompts: bool = False,
    fast_window_attention: bool = True,
) -> nn.Module:
    """A :class:`SamMed3DFullRes` from explicit settings (see the registry's full-resolution variants)."""
    stages = patch_size.bit_length() - 1
    if patch_size != 2**stages or stages < 2:
        raise ValueError(f"patch_size={patch_size} must be a power of 2 of at least 4 (one decoder stage per halving)")
    if len(decoder_chans) != stages:
        raise ValueError(
            f"patch_size={patch_size} needs {stages} decoder stages, got decoder_chans={tuple(decoder_chans)}"
        )
    encoder = ImageEncoderViT3D(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=encoder_embed_dim,
        depth=encoder_depth,
        num_heads=encoder_num_heads,
        out_chans=prompt_embed_dim,
        window_size=window_size,
        global_attn_indexes=tuple(encoder_global_attn_indexes),
        fast_window_attention=fast_window_attention,
        rel_pos_bias=rel_pos_bias,
    )
    dense_chans = 3 if click_maps else 1
    prompt_encoder = PromptEncoder3D(
        embed_dim=prompt_embed_dim,
        mask_in_chans=mask_in_chans,
        box_prompts=box_prompts,
        dense_pe_axis_swap=dense_pe_axis_swap,
        mask_prompt_chans=dense_chans,
        mask_downscale_stages=stages,
    )
    decoder = FullResMaskDecoder3D(
        transformer_dim=prompt_embed_dim,
        transformer_heads=decoder_heads,
        transformer_mlp_dim=decoder_mlp_dim,
        stage_chans=decoder_chans,
        map_chans=dense_chans if click_maps else 0,
    )
    return SamMed3DFullRes(
        encoder,
        prompt_encoder,
        decoder,
        ConvStem3D(tuple(reversed(decoder_chans))),
        click_maps,
        click_map_sigma,
        negative_clicks_clear,
    )
