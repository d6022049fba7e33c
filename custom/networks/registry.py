"""Named network variants: ``build_sam_med3d(name, **overrides)``.

``"sam_med3d"`` is the configuration of every released SAM-Med3D checkpoint (``vit_b_ori`` upstream).
The smaller variants keep its structure (patch 16, windowed blocks of 14 with periodic global blocks)
at widths that train on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .medsam3d import build_medsam3d
from .prompt_encoder import PromptEncoder3D
from .sam_med3d import SamMed3D

SAM_MED3D_VARIANTS: MappingProxyType[str, MappingProxyType[str, Any]] = MappingProxyType(
    {
        "sam_med3d": MappingProxyType(
            dict(
                image_size=128,
                patch_size=16,
                encoder_embed_dim=768,
                encoder_depth=12,
                encoder_num_heads=12,
                encoder_global_attn_indexes=(2, 5, 8, 11),
                window_size=14,
                prompt_embed_dim=384,
                decoder_heads=8,
                decoder_mlp_dim=2048,
                mask_in_chans=16,
            )
        ),
        "sam_med3d_small": MappingProxyType(
            dict(
                image_size=128,
                patch_size=16,
                encoder_embed_dim=384,
                encoder_depth=6,
                encoder_num_heads=6,
                encoder_global_attn_indexes=(2, 5),
                window_size=14,
                prompt_embed_dim=192,
                decoder_heads=8,
                decoder_mlp_dim=1024,
                mask_in_chans=16,
            )
        ),
        # Trained by this bundle on a CPU: 64^3 windows (96 mm at 1.5 mm) of 8^3 patches, all blocks global.
        "sam_med3d_lite": MappingProxyType(
            dict(
                image_size=64,
                patch_size=8,
                encoder_embed_dim=256,
                encoder_depth=6,
                encoder_num_heads=8,
                encoder_global_attn_indexes=(),
                window_size=0,
                prompt_embed_dim=192,
                decoder_heads=8,
                decoder_mlp_dim=1024,
                mask_in_chans=16,
            )
        ),
        # 3DMedSAM (custom/networks/medsam3d.py): 2D SAM ViT-B, frozen, with 3D adapters; 64^3 crops of 8^3
        # patches. ``sam2d_checkpoint`` names a segment-anything ViT-B file (None: random backbone).
        "medsam3d_adapter": MappingProxyType(
            dict(
                image_size=64,
                patch_size=8,
                encoder_embed_dim=768,
                encoder_depth=12,
                encoder_num_heads=12,
                adapter_dim=64,
                skip_depths=(8, 4),
                skip_chans=(64, 64),
                prompt_embed_dim=256,
                decoder_heads=8,
                decoder_mlp_dim=2048,
                mask_in_chans=16,
                freeze_backbone=True,
                sam2d_checkpoint=None,
            )
        ),
        "sam_med3d_tiny": MappingProxyType(
            dict(
                image_size=128,
                patch_size=16,
                encoder_embed_dim=192,
                encoder_depth=4,
                encoder_num_heads=3,
                encoder_global_attn_indexes=(1, 3),
                window_size=14,
                prompt_embed_dim=96,
                decoder_heads=4,
                decoder_mlp_dim=512,
                mask_in_chans=16,
            )
        ),
    }
)


def _build_sam(
    image_size: int,
    patch_size: int,
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: Sequence[int],
    window_size: int,
    prompt_embed_dim: int,
    decoder_heads: int,
    decoder_mlp_dim: int,
    mask_in_chans: int,
    fast_window_attention: bool = True,
) -> SamMed3D:
    if any(i < 0 or i >= encoder_depth for i in encoder_global_attn_indexes):
        raise ValueError(
            f"encoder_global_attn_indexes={tuple(encoder_global_attn_indexes)} must lie in [0, {encoder_depth})"
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
    )
    prompt_encoder = PromptEncoder3D(embed_dim=prompt_embed_dim, mask_in_chans=mask_in_chans)
    decoder = MaskDecoder3D(
        transformer_dim=prompt_embed_dim, transformer_heads=decoder_heads, transformer_mlp_dim=decoder_mlp_dim
    )
    return SamMed3D(encoder, prompt_encoder, decoder)


def available_networks() -> list[str]:
    """Names accepted by :func:`build_sam_med3d`."""
    return sorted(SAM_MED3D_VARIANTS)


def build_sam_med3d(name: str = "sam_med3d", **overrides: Any) -> SamMed3D:
    """Build a registered variant with random weights.

    Args:
        name: one of :func:`available_networks`.
        overrides: any of the variant's settings (``image_size``, ``patch_size``, ``encoder_embed_dim``,
            ``encoder_depth``, ``encoder_num_heads``, ``encoder_global_attn_indexes``, ``window_size``,
            ``prompt_embed_dim``, ``decoder_heads``, ``decoder_mlp_dim``, ``mask_in_chans``) and
            ``fast_window_attention`` (default True; False selects the padded reference computation).
            ``"medsam3d_adapter"`` takes the settings of :func:`custom.networks.medsam3d.build_medsam3d`.
    """
    if name not in SAM_MED3D_VARIANTS:
        raise KeyError(f"unknown network_name {name!r}; registered: {', '.join(available_networks())}")
    settings = dict(SAM_MED3D_VARIANTS[name])
    builder = build_medsam3d if name == "medsam3d_adapter" else _build_sam
    allowed = set(settings) | ({"fast_window_attention"} if builder is _build_sam else set())
    unknown = set(overrides) - allowed
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)} for {name!r}; allowed: {sorted(allowed)}")
    settings.update(overrides)
    return builder(**settings)
