"""3DMedSAM: a 2D SAM ViT-B made volumetric (after Lin et al., Biocybernetics and Biomedical Engineering 45(1), 2025).

The pre-trained 2D transformer blocks stay frozen; the input is natively 3D (a cubic patch embedding
initialised from the 2D kernel), a small 3D adapter in every block learns volumetric context, and a
multi-scale 3D decoder (:mod:`custom.networks.medsam3d_decoder`) fuses features of several depths.

The model is a :class:`SamMed3D` (same ``encode`` / ``decode`` / ``forward`` contract). Its embedding is
packed: ``(B, 256 + s2 + s4, g, g, g)`` (neck output, then the projected features of two shallower depths).

How each 2D SAM tensor reaches 3D (``p`` the 3D patch size, ``g`` the token grid, all blocks global in 3D):

- patch embedding ``[768, 3, 16, 16]``: RGB summed (a grey image is R = G = B), area-resampled to ``p x p``
  with the sum kept (exact for an image seen at ``16 / p`` times coarser resolution), repeated over depth
  and divided by ``p``: a volume constant over depth gets the 2D response of its slice;
- ``pos_embed [1, 64, 64, 768]``: antialiased bilinear resampling to ``g x g``, shared by every depth; a
  learned depth term (zeros at start) is added;
- rel-pos tables ``rel_pos_h`` / ``rel_pos_w`` (27 rows windowed, 127 global): linearly resampled to ``2g - 1``
  rows; ``rel_pos_d`` starts as the resampled ``rel_pos_h``;
- 2D convolutions (neck 1x1 and 3x3, mask down-scaling) inflated over depth and divided by the depth
  extent; transposed up-scaling convolutions repeated over depth (each output voxel has one input);
- Fourier matrix ``[2, 128]`` (rows x, y): rows ``(d, h, w) = (new N(0, std of the 2D matrix), y, x)``;
- everything else (block weights, norms, decoder transformer, tokens, heads) is copied unchanged;
  box-corner embeddings ``point_embeddings.2/3`` are left out.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import LoadReport, read_checkpoint
from .common import LayerNorm3d
from .image_encoder import Block, PatchEmbed3D, resampled_table
from .medsam3d_decoder import MultiScaleMaskDecoder3D, SamPromptEncoder3D
from .sam_med3d import SamMed3D

SAM2D_HINT = (
    "2D SAM ViT-B weights: sam_vit_b_01ec64.pth from the segment-anything release "
    "(github.com/facebookresearch/segment-anything, Apache-2.0)."
)
#: Trained while the pre-trained ViT stays frozen: new 3D modules and the 3D-inflated operators.
TRAINABLE_ENCODER_PARTS = ("patch_embed.", "depth_pos_embed", "neck.", "skip_proj.", ".adapter.")
#: 3D entries with no 2D source: kept as initialised when a 2D checkpoint is loaded.
NEW_3D_PARTS = (".adapter.", "image_encoder.depth_pos_embed", "image_encoder.skip_proj.", "mask_decoder.fuse_")
_LEFT_OUT_2D = ("prompt_encoder.point_embeddings.2.", "prompt_encoder.point_embeddings.3.")


class Adapter3D(nn.Module):
    """Bottleneck with 3D spatial mixing on channels-last tokens: ``(B, D, H, W, C) -> (B, D, H, W, C)``.

    ``Linear C -> r``, GELU, depthwise ``3x3x3`` convolution over the token grid, GELU, ``Linear r -> C``.
    The up projection starts at zero: the adapted network starts equal to the frozen one.
    """

    def __init__(self, dim: int, bottleneck: int = 64) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.mix = nn.Conv3d(bottleneck, bottleneck, kernel_size=3, padding=1, groups=bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.down(x))
        h = self.mix(h.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        return self.up(F.gelu(h))


class AdapterBlock(Block):
    """A global 3D transformer block with an adapter parallel to its MLP: ``x + attn(n1(x))``, then
    ``x + mlp(n2(x)) + adapter(n2(x))``."""

    def __init__(
        self, dim: int, num_heads: int, grid_size: int, adapter_dim: int, rel_pos_bias: str, name: str = "block"
    ) -> None:
        super().__init__(dim, num_heads, window_size=0, grid_size=grid_size, rel_pos_bias=rel_pos_bias, name=name)
        self.adapter = Adapter3D(dim, adapter_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W, C)`` -> ``(B, D, H, W, C)``."""
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + self.mlp(h) + self.adapter(h)


class MedSAM3DImageEncoder(nn.Module):
    """``(B, 1, D, H, W)`` -> packed embedding ``(B, out_chans + sum(skip_chans), D/p, H/p, W/p)``.

    Args:
        img_size: side of the cubic crop the position terms are made for (voxels).
        patch_size: ``p`` (voxels); every input side must be a multiple of it.
        embed_dim, depth, num_heads: the ViT (768, 12, 12 for ViT-B).
        out_chans: neck width (256 in 2D SAM).
        adapter_dim: adapter bottleneck width.
        skip_depths: block counts after which features are taken for the 2x and 4x decoder stages.
        skip_chans: their projected widths.
        rel_pos_bias: ``"decomposed"`` (2D SAM's textbook bias, carried to 3D) or ``"upstream"``.
    """

    def __init__(
        self,
        img_size: int = 64,
        patch_size: int = 8,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        out_chans: int = 256,
        adapter_dim: int = 64,
        skip_depths: Sequence[int] = (8, 4),
        skip_chans: Sequence[int] = (64, 64),
        rel_pos_bias: str = "decomposed",
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        if len(skip_depths) != 2 or len(skip_chans) != 2 or any(not 1 <= d <= depth for d in skip_depths):
            raise ValueError(f"skip_depths={tuple(skip_depths)} must be two block counts in [1, {depth}]")
        self.img_size, self.patch_size = img_size, patch_size
        self.skip_depths = tuple(int(d) for d in skip_depths)
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed3D(patch_size, 1, embed_dim)
        # A random stand-in for the pre-trained 2D table (replaced when a 2D checkpoint is loaded).
        self.pos_embed = nn.Parameter(torch.randn(1, grid, grid, embed_dim) * 0.02)
        self.depth_pos_embed = nn.Parameter(torch.zeros(1, grid, embed_dim))
        self.rel_pos_bias = rel_pos_bias
        self.blocks = nn.ModuleList(
            AdapterBlock(embed_dim, num_heads, grid, adapter_dim, rel_pos_bias, f"image_encoder.blocks.{i}")
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )
        self.skip_proj = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(embed_dim, eps=1e-6), nn.Linear(embed_dim, c)) for c in skip_chans
        )

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` -> tokens with position ``(B, D/p, H/p, W/p, C)``."""
        if x.ndim != 5 or x.shape[1] != 1 or any(s % self.patch_size for s in x.shape[2:]):
            raise ValueError(
                f"expected an image (B, 1, D, H, W) with sides that are multiples of {self.patch_size}, "
                f"got shape {tuple(x.shape)}"
            )
        x = self.patch_embed(x)
        pos = self.pos_embed[:, None] + self.depth_pos_embed[:, :, None, None]
        if pos.shape[1:4] != x.shape[1:4]:
            pos = F.interpolate(
                pos.permute(0, 4, 1, 2, 3), size=x.shape[1:4], mode="trilinear", align_corners=False
            ).permute(0, 2, 3, 4, 1)
        return x + pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(x)
        skips = {}
        for depth, block in enumerate(self.blocks, start=1):
            x = block(x)
            if depth in self.skip_depths:
                skips[depth] = x
        features = [self.neck(x.permute(0, 4, 1, 2, 3))]
        for depth, proj in zip(self.skip_depths, self.skip_proj):
            features.append(proj(skips[depth]).permute(0, 4, 1, 2, 3))
        return torch.cat([f.to(features[0].dtype) for f in features], dim=1)


@dataclass
class Sam2dLoadReport(LoadReport):
    """What loading a 2D SAM checkpoint did: ``loaded`` (copied unchanged), ``adapted`` (2D key -> how it
    became 3D), ``left_out`` (2D key -> why), ``new`` (3D entries with no 2D source, kept as initialised)."""

    adapted: dict[str, str] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)

    def describe(self, limit: int = 20) -> str:
        def show(keys: Sequence[str]) -> str:
            return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")

        return (
            f"2D SAM: {len(self.loaded)} tensors used unchanged; {len(self.adapted)} adapted to 3D: "
            f"{show(list(self.adapted))}; {len(self.left_out)} left out: {show(list(self.left_out))}; "
            f"{len(self.new)} new 3D entries: {show(self.new)}"
        )


def _inflate(weight: torch.Tensor, depth: int, divide: bool) -> torch.Tensor:
    """2D kernel ``(O, I, kh, kw)`` -> 3D ``(O, I, depth, kh, kw)`` repeated over depth (/depth if divide)."""
    out = weight.unsqueeze(2).repeat(1, 1, depth, 1, 1)
    return out / depth if divide else out


class MedSAM3D(SamMed3D):
    """3DMedSAM: :class:`MedSAM3DImageEncoder`, :class:`SamPromptEncoder3D`, :class:`MultiScaleMaskDecoder3D`.

    Args:
        freeze_backbone: keep the pre-trained ViT (block weights, 2D position table) frozen; the adapters,
            3D patch embedding, depth position term, neck, skip projections, prompt encoder and decoder train.
    """

    def __init__(
        self,
        image_encoder: MedSAM3DImageEncoder,
        prompt_encoder: SamPromptEncoder3D,
        mask_decoder: MultiScaleMaskDecoder3D,
        freeze_backbone: bool = True,
    ) -> None:
        super().__init__(image_encoder, prompt_encoder, mask_decoder)
        self.freeze_backbone = freeze_backbone
        frozen = set(self.frozen_parameter_names())
        for name, param in self.named_parameters():
            param.requires_grad_(name not in frozen)

    def frozen_parameter_names(self) -> list[str]:
        """Parameters that training must leave alone (``custom.engines.trainable`` freezes them)."""
        if not self.freeze_backbone:
            return []
        return [
            name
            for name, _ in self.named_parameters()
            if name.startswith("image_encoder.") and not any(part in name for part in TRAINABLE_ENCODER_PARTS)
        ]

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        return sum(p.numel() for p in self.parameters() if p.requires_grad), total

    @staticmethod
    def is_sam2d_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``state`` is in segment-anything's 2D format (a 4D patch kernel and a 4D ``pos_embed``)."""
        kernel, pos = state.get("image_encoder.patch_embed.proj.weight"), state.get("image_encoder.pos_embed")
        return kernel is not None and pos is not None and kernel.ndim == 4 and pos.ndim == 4

    def _adapt_2d(self, key: str, value: torch.Tensor, target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The 3D entries made from one 2D tensor (empty when it has no rule)."""
        p, grid = self.patch_size, self.image_encoder.pos_embed.shape[1]
        if key == "image_encoder.patch_embed.proj.weight":
            k = value.shape[-1]
            kernel = F.adaptive_avg_pool2d(value.float().sum(1, keepdim=True), p) * (k * k) / (p * p)
            return {key: _inflate(kernel, p, divide=True)}
        if key == "image_encoder.pos_embed":
            hw = F.interpolate(value.float().permute(0, 3, 1, 2), size=(grid, grid), mode="bilinear", antialias=True)
            return {key: hw.permute(0, 2, 3, 1)}
        match = re.fullmatch(r"(image_encoder\.blocks\.\d+\.attn\.)rel_pos_([hw])", key)
        if match:
            table = resampled_table(value.float(), 2 * grid - 1).clone()
            out = {key: table}
            if match.group(2) == "h":
                out[match.group(1) + "rel_pos_d"] = table.clone()
            return out
        if key == "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":
            gen = torch.Generator().manual_seed(0)
            depth_row = torch.randn(1, value.shape[1], generator=gen) * value.float().std()
            return {key: torch.cat([depth_row, value[1:2].float(), value[0:1].float()])}
        if value.ndim == 4 and key in target and target[key].ndim == 5:
            transposed = key.startswith("mask_decoder.output_upscaling.")
            return {key: _inflate(value.float(), target[key].shape[2], divide=not transposed)}
        return {}

    def load_sam2d_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> Sam2dLoadReport:
        """Initialise from a 2D SAM state dict (segment-anything keys); see the module docstring.

        Raises:
            ValueError: naming ``source`` and the key, when the file is not in 2D SAM format, lacks an entry
                this model needs, or holds an entry of another shape than this model's width implies.
        """
        if not self.is_sam2d_state_dict(state):
            raise ValueError(
                f"{source} is not a 2D SAM checkpoint: expected image_encoder.patch_embed.proj.weight "
                f"[768, 3, 16, 16] and image_encoder.pos_embed [1, 64, 64, 768]. {SAM2D_HINT}"
            )
        target = self.state_dict()
        report, converted = Sam2dLoadReport(), {}
        depth = len(self.image_encoder.blocks)
        for key, value in state.items():
            block = re.match(r"image_encoder\.blocks\.(\d+)\.", key)
            if block and int(block.group(1)) >= depth:
                report.left_out[key] = f"block {block.group(1)} is beyond this model's depth {depth}"
                continue
            if key.startswith(_LEFT_OUT_2D):
                report.left_out[key] = "box-corner embedding: no box prompts in 3D"
                continue
            adapted = self._adapt_2d(key, value, target)
            if adapted:
                report.adapted[key] = f"{tuple(value.shape)} -> " + ", ".join(
                    f"{k} {tuple(v.shape)}" for k, v in adapted.items()
                )
            elif key in target:
                adapted = {key: value}
                report.loaded.append(key)
            else:
                report.left_out[key] = "no counterpart in the 3D model"
                continue
            for new_key, tensor in adapted.items():
                if tuple(tensor.shape) != tuple(target[new_key].shape):
                    raise ValueError(
                        f"{source}: {key} of shape {tuple(value.shape)} gives {new_key} {tuple(tensor.shape)}, "
                        f"but this model expects {tuple(target[new_key].shape)}. Is it a 2D SAM ViT-B checkpoint "
                        f"matching the network's width? {SAM2D_HINT}"
                    )
                converted[new_key] = tensor.to(target[new_key].dtype)
        report.new = [k for k in target if k not in converted and any(part in k for part in NEW_3D_PARTS)]
        absent = [k for k in target if k not in converted and k not in report.new]
        if absent:
            raise ValueError(
                f"{source} is not a complete 2D SAM checkpoint: {len(absent)} entries this model needs are "
                f"missing, e.g. {', '.join(absent[:5])}. {SAM2D_HINT}"
            )
        self.load_state_dict(converted, strict=False)
        return report


def build_medsam3d(
    image_size: int = 64,
    patch_size: int = 8,
    encoder_embed_dim: int = 768,
    encoder_depth: int = 12,
    encoder_num_heads: int = 12,
    adapter_dim: int = 64,
    skip_depths: Sequence[int] = (8, 4),
    skip_chans: Sequence[int] = (64, 64),
    prompt_embed_dim: int = 256,
    decoder_heads: int = 8,
    decoder_mlp_dim: int = 2048,
    mask_in_chans: int = 16,
    freeze_backbone: bool = True,
    sam2d_checkpoint: str | os.PathLike | None = None,
    rel_pos_bias: str = "decomposed",
) -> MedSAM3D:
    """Build 3DMedSAM, from a 2D SAM ViT-B checkpoint file when ``sam2d_checkpoint`` is given (random
    otherwise; the backbone is frozen either way unless ``freeze_backbone=False``). Logs the load report and
    the trainable / total parameter counts."""
    encoder = MedSAM3DImageEncoder(
        image_size,
        patch_size,
        encoder_embed_dim,
        encoder_depth,
        encoder_num_heads,
        prompt_embed_dim,
        adapter_dim,
        skip_depths,
        skip_chans,
        rel_pos_bias,
    )
    decoder = MultiScaleMaskDecoder3D(prompt_embed_dim, decoder_heads, decoder_mlp_dim, skip_chans)
    model = MedSAM3D(encoder, SamPromptEncoder3D(prompt_embed_dim, mask_in_chans), decoder, freeze_backbone)
    logger = logging.getLogger(__name__)
    if sam2d_checkpoint is not None:
        report = model.load_sam2d_state_dict(read_checkpoint(sam2d_checkpoint), source=str(sam2d_checkpoint))
        logger.info(f"loaded {sam2d_checkpoint}: {report.describe()}")
    trainable, total = model.parameter_counts()
    logger.info(f"medsam3d_adapter: {trainable:,} trainable of {total:,} parameters")
    return model
