"""Fully automatic segmentation with the SAM-Med3D image encoder as a pre-trained UNETR backbone.

The SAM-Med3D papers report that initialising UNETR's encoder with SAM-Med3D's raised Dice on AMOS and
TotalSegmentator; :class:`SamEncoderUNETR` is that network for any registered variant: the encoder's
intermediate block outputs are the skip features of a UNETR decoder (MONAI's ``UnetrPrUpBlock`` /
``UnetrUpBlock``), and the neck's embedding is the bottleneck.

A patch of side ``p = 2^L`` voxels needs ``L`` upsampling stages back to the input grid: ``L - 1`` skips
come from intermediate blocks (16-voxel patches: 3, like UNETR; the lite variant's 8-voxel patches: 2) plus
one full-resolution convolutional skip from the image itself.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from .checkpoint import LoadReport, check_conventions, compare_state_dicts, open_checkpoint
from .image_encoder import ImageEncoderViT3D
from .registry import build_sam_med3d

ENCODER_PREFIX = "image_encoder."
logger = logging.getLogger(__name__)


def default_skip_blocks(depth: int, num_skips: int) -> tuple[int, ...]:
    """Evenly spaced block indices (0-based) whose outputs feed the skips, deepest last.

    UNETR's choice for 12 blocks and 3 skips (blocks 3, 6, 9 counted from 1) generalised: block
    ``round(depth * k / (num_skips + 1)) - 1`` for ``k = 1..num_skips``; for the lite variant (6 blocks,
    2 skips) blocks 1 and 3.
    """
    if num_skips < 0 or num_skips >= depth:
        raise ValueError(f"{num_skips} skip(s) need more than {num_skips} encoder blocks; the encoder has {depth}")
    return tuple(round(depth * k / (num_skips + 1)) - 1 for k in range(1, num_skips + 1))


class SamEncoderUNETR(nn.Module):
    """UNETR-style automatic segmentation around a SAM-Med3D image encoder.

    Args:
        image_encoder: the backbone (any variant); kept as ``self.image_encoder`` so its state-dict keys are
            those of a SAM-Med3D checkpoint (``image_encoder.*``).
        out_channels: classes including background (``>= 2``).
        feature_size: channels of the full-resolution level; level ``k`` (``1/2^k`` resolution) has
            ``feature_size * 2^k``.
        skip_blocks: ``log2(patch_size) - 1`` increasing block indices whose outputs are the skips (default:
            :func:`default_skip_blocks`).
        norm_name: normalisation of the convolutional blocks (MONAI name).
        res_block: residual convolutional blocks.

    ``forward``: ``(B, in_chans, D, H, W)`` with sides multiples of the patch size -> logits
    ``(B, out_channels, D, H, W)``.
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT3D,
        out_channels: int,
        feature_size: int = 16,
        skip_blocks: Sequence[int] | None = None,
        norm_name: str = "instance",
        res_block: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(out_channels, int) or isinstance(out_channels, bool) or out_channels < 2:
            raise ValueError(f"out_channels must be an integer >= 2 (background + classes), got {out_channels!r}")
        patch = image_encoder.patch_size
        levels = round(math.log2(patch))
        if 2**levels != patch or levels < 1:
            raise ValueError(f"patch_size must be a power of two >= 2 for the UNETR decoder, got {patch}")
        depth = len(image_encoder.blocks)
        skip_blocks = tuple(default_skip_blocks(depth, levels - 1) if skip_blocks is None else skip_blocks)
        if len(skip_blocks) != levels - 1 or list(skip_blocks) != sorted(set(skip_blocks)):
            raise ValueError(
                f"skip_blocks must be {levels - 1} increasing block indices for patch_size {patch}, got {skip_blocks}"
            )
        if skip_blocks and not 0 <= skip_blocks[0] <= skip_blocks[-1] < depth:
            raise ValueError(f"skip_blocks {skip_blocks} must lie in [0, {depth})")
        self.image_encoder = image_encoder
        self.skip_blocks = skip_blocks
        self.out_channels = out_channels
        in_chans = image_encoder.patch_embed.proj.in_channels
        width = image_encoder.patch_embed.proj.out_channels
        neck_chans = image_encoder.neck[0].out_channels
        conv = dict(spatial_dims=3, kernel_size=3, norm_name=norm_name, res_block=res_block)
        self.input_skip = UnetrBasicBlock(in_channels=in_chans, out_channels=feature_size, stride=1, **conv)
        # skip k (1/2^k resolution) from a token grid at 1/2^levels: levels - k transposed convolutions
        self.token_skips = nn.ModuleList(
            UnetrPrUpBlock(
                in_channels=width,
                out_channels=feature_size * 2**k,
                num_layer=levels - k - 1,
                stride=1,
                upsample_kernel_size=2,
                conv_block=True,
                **conv,
            )
            for k in range(1, levels)
        )
        ups, channels = [], neck_chans
        for k in reversed(range(levels)):
            ups.append(
                UnetrUpBlock(in_channels=channels, out_channels=feature_size * 2**k, upsample_kernel_size=2, **conv)
            )
            channels = feature_size * 2**k
        self.up_blocks = nn.ModuleList(ups)
        self.head = UnetOutBlock(spatial_dims=3, in_channels=feature_size, out_channels=out_channels)

    @property
    def img_size(self) -> int:
        """Side (voxels) of the window the encoder's position embedding was made for: the inferer's ROI."""
        return self.image_encoder.img_size

    def encoder_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Skip token grids ``(B, width, D/p, H/p, W/p)`` (shallowest first) and the neck's embedding
        ``(B, out_chans, D/p, H/p, W/p)``."""
        tokens = self.image_encoder.embed_tokens(x)
        skips = []
        for i, block in enumerate(self.image_encoder.blocks):
            tokens = block(tokens)
            if i in self.skip_blocks:
                skips.append(tokens.permute(0, 4, 1, 2, 3))
        return skips, self.image_encoder.neck(tokens.permute(0, 4, 1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips, bottleneck = self.encoder_features(x)
        # resolution order 1/2^(levels-1) ... 1/2, then the full-resolution image skip
        skip_features = [block(s) for block, s in zip(self.token_skips, skips)][::-1] + [self.input_skip(x)]
        out = bottleneck
        for up, skip in zip(self.up_blocks, skip_features):
            out = up(out, skip)
        return self.head(out)


def build_autoseg(
    network_name: str = "sam_med3d_lite",
    out_channels: int = 8,
    feature_size: int = 16,
    skip_blocks: Sequence[int] | None = None,
    norm_name: str = "instance",
    res_block: bool = True,
    **encoder_overrides,
) -> SamEncoderUNETR:
    """A :class:`SamEncoderUNETR` on the image encoder of registered variant ``network_name`` (random weights).

    Args:
        network_name: a name of :func:`custom.networks.available_networks`.
        out_channels: classes including background.
        feature_size, skip_blocks, norm_name, res_block: see :class:`SamEncoderUNETR`.
        encoder_overrides: settings of :func:`custom.networks.build_sam_med3d` (``image_size``,
            ``encoder_depth``...); prompt/decoder settings are accepted and have no effect.
    """
    encoder = getattr(build_sam_med3d(network_name, **encoder_overrides), "image_encoder", None)
    if not isinstance(encoder, ImageEncoderViT3D):
        raise ValueError(
            f"network_name {network_name!r} has no SAM-Med3D image encoder (found {type(encoder).__name__}); "
            "the automatic segmentation network is built on the SAM-Med3D variants' ImageEncoderViT3D"
        )
    return SamEncoderUNETR(encoder, out_channels, feature_size, skip_blocks, norm_name, res_block)


def load_encoder_weights(network: SamEncoderUNETR, path: str | os.PathLike, allow_pickle: bool = False) -> LoadReport:
    """Copy the ``image_encoder.*`` entries of any checkpoint :func:`~custom.networks.load_checkpoint`
    accepts (this bundle's ``model.pt``, the released ``sam_med3d_turbo.pth``, an autoseg checkpoint) into
    ``network.image_encoder``.

    Returns:
        a :class:`LoadReport`: ``loaded`` the encoder keys taken, ``unexpected`` the file's other keys, left
        unused (prompt encoder, mask decoder...).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file has no ``image_encoder.*`` key, or lacks an encoder key, or holds one of
            another shape (all named: a checkpoint of another variant), or was trained with another
            relative-position bias.
    """
    checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    file_state = checkpoint.state
    if not any(k.startswith(ENCODER_PREFIX) for k in file_state):
        raise ValueError(
            f"checkpoint {str(path)!r} holds no '{ENCODER_PREFIX}*' key, so no SAM-Med3D encoder; "
            f"its first keys: {sorted(file_state)[:8]}"
        )
    encoder_state = {ENCODER_PREFIX + k: v for k, v in network.image_encoder.state_dict().items()}
    report = compare_state_dicts(encoder_state, file_state)
    if report.missing or report.shape_mismatches:
        partial = LoadReport(missing=report.missing, shape_mismatches=report.shape_mismatches)
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit the {type(network.image_encoder).__name__} of this network: "
            f"{partial.describe()}. Is --network_name the variant this file was trained with?"
        )
    check_conventions(network, checkpoint)
    network.image_encoder.load_state_dict({k[len(ENCODER_PREFIX) :]: file_state[k] for k in report.loaded})
    return report


def load_autoseg_checkpoint(
    network: SamEncoderUNETR, path: str | os.PathLike, allow_pickle: bool = False
) -> LoadReport:
    """All of ``network``'s weights from an autoseg checkpoint (``{"model": state_dict}``), strictly.

    Raises:
        ValueError: the file's class count differs from ``network.out_channels`` (both named), or any
            other key is missing, left over or of another shape.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"autoseg checkpoint {str(path)!r} does not exist: train one with bundle/configs/train_autoseg.json "
            "(it writes model.pt to --output_dir) and pass it as --ckpt_path"
        )
    checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    file_state = checkpoint.state
    head = "head.conv.conv.weight"
    if head in file_state and file_state[head].shape[0] != network.out_channels:
        raise ValueError(
            f"checkpoint {str(path)!r} predicts {file_state[head].shape[0]} classes (background included) but the "
            f"network was built with out_channels={network.out_channels}: set --out_channels accordingly"
        )
    report = compare_state_dicts(network.state_dict(), file_state)
    if not report.ok:
        raise ValueError(
            f"checkpoint {str(path)!r} is not an autoseg checkpoint of this network: {report.describe()}. "
            "Are --network_name and --feature_size those it was trained with?"
        )
    check_conventions(network, checkpoint)
    network.load_state_dict(file_state)
    return report
