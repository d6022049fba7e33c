"""Named network variants: each name maps to its builder and its settings; ``build_sam_med3d(name, **overrides)``.

``"sam_med3d"`` is the configuration of every released SAM-Med3D checkpoint (``vit_b_ori`` upstream).
The smaller variants keep its structure (patch 16, windowed blocks of 14 with periodic global blocks)
at widths that train on a CPU.

Every SAM-Med3D variant names its relative-position bias (``rel_pos_bias``, see
:class:`custom.networks.image_encoder.Attention`): ``"upstream"`` is what the released weights were trained
with; ``"decomposed"`` (the textbook bias) is what the lite variants trained here use. Checkpoints written by
this bundle record it, and :func:`custom.networks.load_weights` refuses a file whose bias differs from the
network's. Likewise ``dense_pe_axis_swap``: the released weights' dense positional encoding swaps axes 0 and 1
(reference §1); the full-resolution variants, trained here, do not.

The full-resolution variants (``sam_med3d_lite_fullres*``, :mod:`custom.networks.sam_med3d_fullres`) add a
convolutional stem and predict the window's own voxels instead of SAM's quarter-resolution logits; the
``_clickmaps`` one also gives clicks as dense maps beside the previous logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import nn

from .common import as_flag
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .medsam3d import build_medsam3d
from .prompt_encoder import PromptEncoder3D
from .sam_med3d import SamMed3D
from .sam_med3d_fullres import build_sam_fullres


def build_sam(
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
    rel_pos_bias: str,
    box_prompts: bool = False,
    fast_window_attention: bool = True,
    dense_pe_axis_swap: bool = True,
) -> SamMed3D:
    """A SAM-Med3D network (encoder, prompt encoder, decoder) from explicit settings; see the variants."""
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
        rel_pos_bias=rel_pos_bias,
    )
    prompt_encoder = PromptEncoder3D(
        embed_dim=prompt_embed_dim,
        mask_in_chans=mask_in_chans,
        box_prompts=box_prompts,
        dense_pe_axis_swap=dense_pe_axis_swap,
    )
    decoder = MaskDecoder3D(
        transformer_dim=prompt_embed_dim, transformer_heads=decoder_heads, transformer_mlp_dim=decoder_mlp_dim
    )
    return SamMed3D(encoder, prompt_encoder, decoder)


@dataclass(frozen=True)
class Variant:
    """A registered network: its builder, the settings it is built with, and the overrides it also accepts."""

    builder: Callable[..., nn.Module]
    settings: Mapping[str, Any]
    description: str
    extra_overrides: frozenset[str] = frozenset()

    @property
    def rel_pos_bias(self) -> str:
        return self.settings["rel_pos_bias"]


def _sam_variant(description: str, builder: Callable[..., nn.Module] = build_sam, **settings: Any) -> Variant:
    settings.setdefault("box_prompts", False)
    settings.setdefault("dense_pe_axis_swap", True)
    return Variant(builder, MappingProxyType(settings), description, frozenset({"fast_window_attention"}))


#: the released configuration (reference §1): 128^3 windows of 16^3 patches, windowed blocks with four global ones
_RELEASED = dict(
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
    rel_pos_bias="upstream",
)

#: what the lite variants change: 64^3 windows (96 mm at 1.5 mm) of 8^3 patches, all blocks global, narrower
_LITE = dict(
    _RELEASED,
    image_size=64,
    patch_size=8,
    encoder_embed_dim=256,
    encoder_depth=6,
    encoder_num_heads=8,
    encoder_global_attn_indexes=(),
    window_size=0,
    prompt_embed_dim=192,
    decoder_mlp_dim=1024,
    rel_pos_bias="decomposed",
)


VARIANTS: Mapping[str, Variant] = MappingProxyType(
    {
        "sam_med3d": _sam_variant("the released configuration; loads the official checkpoints", **_RELEASED),
        "sam_med3d_small": _sam_variant(
            "the released structure at half width: training on a CPU or a small GPU",
            **dict(
                _RELEASED,
                encoder_embed_dim=384,
                encoder_depth=6,
                encoder_num_heads=6,
                encoder_global_attn_indexes=(2, 5),
                prompt_embed_dim=192,
                decoder_mlp_dim=1024,
            ),
        ),
        # Trained by this bundle on a CPU (the shipped model.pt's encoder): the textbook bias it was trained with.
        "sam_med3d_lite": _sam_variant("64^3 windows of 8^3 patches at 1.5 mm; low-res (3 mm) logits", **_LITE),
        # Full-resolution variants (custom/networks/sam_med3d_fullres.py): a convolutional stem and a decoder that
        # predicts the window's 1.5 mm voxels; no axis swap in the dense positional encoding (trained here).
        "sam_med3d_lite_fullres": _sam_variant(
            "lite encoder, convolutional stem, full-resolution decoder; clicks as tokens",
            build_sam_fullres,
            **dict(_LITE, dense_pe_axis_swap=False, click_maps=False, negative_clicks_clear=False),
        ),
        "sam_med3d_lite_fullres_clickmaps": _sam_variant(
            "lite encoder, convolutional stem, full-resolution decoder; clicks as tokens and as dense maps; a negative "
            "click clears its cell of the earlier mask",
            build_sam_fullres,
            **dict(_LITE, dense_pe_axis_swap=False, click_maps=True, negative_clicks_clear=True),
        ),
        "sam_med3d_tiny": _sam_variant(
            "tests and quick experiments",
            **dict(
                _RELEASED,
                encoder_embed_dim=192,
                encoder_depth=4,
                encoder_num_heads=3,
                encoder_global_attn_indexes=(1, 3),
                prompt_embed_dim=96,
                decoder_heads=4,
                decoder_mlp_dim=512,
            ),
        ),
        # 3DMedSAM (custom/networks/medsam3d.py): 2D SAM ViT-B, frozen, with 3D adapters; 64^3 crops of 8^3
        # patches; 2D SAM's textbook 2D bias carried to 3D. ``sam2d_checkpoint`` names a segment-anything
        # ViT-B file (None: random backbone).
        "medsam3d_adapter": Variant(
            build_medsam3d,
            MappingProxyType(
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
                    rel_pos_bias="decomposed",
                )
            ),
            "3DMedSAM: a frozen 2D SAM ViT-B made volumetric with 3D adapters and a multi-scale 3D decoder",
        ),
    }
)

#: the yes/no settings of the builders: a command line's "false" becomes False, not a truthy string
FLAG_SETTINGS = frozenset(
    {
        "box_prompts",
        "fast_window_attention",
        "freeze_backbone",
        "dense_pe_axis_swap",
        "click_maps",
        "negative_clicks_clear",
    }
)

#: name -> settings (read-only), for code that only needs the numbers.
SAM_MED3D_VARIANTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({k: v.settings for k, v in VARIANTS.items()})


def available_networks() -> list[str]:
    """Names accepted by :func:`build_sam_med3d`."""
    return sorted(VARIANTS)


def variant(name: str) -> Variant:
    """The registered :class:`Variant` called ``name``."""
    if name not in VARIANTS:
        raise KeyError(f"unknown network_name {name!r}; registered: {', '.join(available_networks())}")
    return VARIANTS[name]


def build_sam_med3d(name: str = "sam_med3d", **overrides: Any) -> nn.Module:
    """Build a registered variant with random weights.

    Args:
        name: one of :func:`available_networks`.
        overrides: any of the variant's settings (``image_size``, ``patch_size``, ``encoder_embed_dim``,
            ``encoder_depth``, ``encoder_num_heads``, ``encoder_global_attn_indexes``, ``window_size``,
            ``prompt_embed_dim``, ``decoder_heads``, ``decoder_mlp_dim``, ``mask_in_chans``, ``rel_pos_bias``,
            ``box_prompts``, ``dense_pe_axis_swap``; the full-resolution variants also ``decoder_chans``,
            ``click_maps``, ``click_map_sigma``, ``negative_clicks_clear``)
            and ``fast_window_attention`` (default True; False selects the padded reference computation).
            ``"medsam3d_adapter"`` takes the settings of :func:`custom.networks.medsam3d.build_medsam3d`.
    """
    chosen = variant(name)
    allowed = set(chosen.settings) | chosen.extra_overrides
    unknown = set(overrides) - allowed
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)} for {name!r}; allowed: {sorted(allowed)}")
    settings = dict(chosen.settings, **overrides)
    for key in FLAG_SETTINGS & set(settings):
        settings[key] = as_flag(settings[key], key)
    return chosen.builder(**settings)
