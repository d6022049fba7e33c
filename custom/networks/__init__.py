"""Networks: the SAM-Med3D encoder, prompt encoder, decoder, model, registry and checkpoint loading."""

from .autoseg import (
    SamEncoderUNETR,
    build_autoseg,
    load_encoder_weights,
    with_autoseg_checkpoint,
    with_encoder_weights,
)
from .checkpoint import (
    CheckpointFile,
    LoadReport,
    bundle_conventions,
    check_conventions,
    check_rel_pos_bias,
    checkpoint_payload,
    compare_state_dicts,
    extract_state_dict,
    load_checkpoint,
    network_rel_pos_bias,
    open_checkpoint,
    read_checkpoint,
    save_atomic,
    with_checkpoint,
)
from .common import as_flag
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .medsam3d import MedSAM3D, Sam2dLoadReport, build_medsam3d, with_pretrained
from .prompt_encoder import PromptEncoder3D
from .registry import SAM_MED3D_VARIANTS, VARIANTS, Variant, available_networks, build_sam_med3d, variant
from .sam_med3d import SamMed3D, upsample_logits

__all__ = [
    "as_flag",
    "SamEncoderUNETR",
    "build_autoseg",
    "load_encoder_weights",
    "with_autoseg_checkpoint",
    "with_encoder_weights",
    "ImageEncoderViT3D",
    "CheckpointFile",
    "LoadReport",
    "MaskDecoder3D",
    "MedSAM3D",
    "PromptEncoder3D",
    "SAM_MED3D_VARIANTS",
    "VARIANTS",
    "Variant",
    "Sam2dLoadReport",
    "SamMed3D",
    "available_networks",
    "build_medsam3d",
    "build_sam_med3d",
    "bundle_conventions",
    "check_conventions",
    "check_rel_pos_bias",
    "checkpoint_payload",
    "compare_state_dicts",
    "extract_state_dict",
    "load_checkpoint",
    "network_rel_pos_bias",
    "open_checkpoint",
    "read_checkpoint",
    "save_atomic",
    "upsample_logits",
    "variant",
    "with_checkpoint",
    "with_pretrained",
]
