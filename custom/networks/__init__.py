"""Networks: the SAM-Med3D encoder, prompt encoder, decoder, model, registry and checkpoint loading."""

from .checkpoint import (
    LoadReport,
    compare_state_dicts,
    extract_state_dict,
    load_checkpoint,
    read_checkpoint,
    save_atomic,
    with_checkpoint,
)
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .registry import SAM_MED3D_VARIANTS, available_networks, build_sam_med3d
from .sam_med3d import SamMed3D, upsample_logits

__all__ = [
    "ImageEncoderViT3D",
    "LoadReport",
    "MaskDecoder3D",
    "PromptEncoder3D",
    "SAM_MED3D_VARIANTS",
    "SamMed3D",
    "available_networks",
    "build_sam_med3d",
    "compare_state_dicts",
    "extract_state_dict",
    "load_checkpoint",
    "read_checkpoint",
    "save_atomic",
    "upsample_logits",
    "with_checkpoint",
]
