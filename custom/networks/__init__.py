"""Networks: build a registered variant, put a file's weights into it, save it in this bundle's format.

The modules behind these (encoder, prompt encoder, decoders, checkpoint reading) are imported from their own
files (``custom.networks.checkpoint`` and so on) where a caller needs more than this surface.
"""

from .autoseg import SamEncoderUNETR, build_autoseg
from .checkpoint import checkpoint_payload
from .medsam3d import MedSAM3D, build_medsam3d
from .registry import available_networks, build_sam_med3d
from .sam_med3d import SamMed3D, upsample_logits
from .weights import load_weights, with_weights

__all__ = [
    "MedSAM3D",
    "SamEncoderUNETR",
    "SamMed3D",
    "available_networks",
    "build_autoseg",
    "build_medsam3d",
    "build_sam_med3d",
    "checkpoint_payload",
    "load_weights",
    "upsample_logits",
    "with_weights",
]
