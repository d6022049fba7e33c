"""The one public way to put a file's weights into a network: :func:`load_weights` (returns what was loaded) and
its form for bundle configs, :func:`with_weights` (returns the network).

A file is read in one of two roles. The network's own trained weights (``start=False``, inference and evaluation)
load strictly: every key, same shapes, same conventions. A starting point for training (``start=True``, the
``pretrained_ckpt`` of the train configs) may also be what the network is built from rather than a file of it: a
2D SAM checkpoint for :class:`~custom.networks.medsam3d.MedSAM3D`, any SAM-Med3D checkpoint's image encoder for
the automatic segmentation network, a file without box embeddings for a network built with box prompts.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from .autoseg import SamEncoderUNETR, load_autoseg_checkpoint, load_encoder_weights
from .checkpoint import compare_state_dicts, load_checkpoint, read_checkpoint
from .medsam3d import MedSAM3D

logger = logging.getLogger(__name__)


def load_weights(
    network: nn.Module,
    path: str | os.PathLike,
    start: bool = False,
    strict: bool = True,
    allow_pickle: bool = False,
) -> Any:
    """Load ``path`` into ``network`` as its trained weights, or with ``start`` as a starting point for training.

    Args:
        network: a network of :mod:`custom.networks` (SAM-Med3D variant, 3DMedSAM, automatic segmentation).
        path: any file :func:`~custom.networks.checkpoint.open_checkpoint` accepts.
        start: also accept what the network is built from (see the module docstring).
        strict: for trained weights, fail unless every key is in the file with the same shape and nothing is left
            over; without it, the entries that fit are loaded and the rest reported. The automatic segmentation
            network's trained weights always load strictly (a partial head would predict other classes).
        allow_pickle: read with ``weights_only=False`` (older upstream files; trusted sources only).

    Returns:
        the load report (``describe()`` says what was loaded, missing and left over).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file does not fit the network (the keys named), holds NaN or infinite values, or was
            trained with other conventions (``rel_pos_bias``, ``dense_pe_axis_swap``).
    """
    if isinstance(network, SamEncoderUNETR):
        load = load_encoder_weights if start else load_autoseg_checkpoint
        return load(network, path, allow_pickle=allow_pickle)
    if start and isinstance(network, MedSAM3D):
        state = read_checkpoint(path, allow_pickle=allow_pickle)
        if MedSAM3D.is_sam2d_state_dict(state):
            return network.load_sam2d_state_dict(state, source=str(path))
    if start and getattr(getattr(network, "prompt_encoder", None), "box_prompts", False):
        probe = compare_state_dicts(network.state_dict(), read_checkpoint(path, allow_pickle=allow_pickle))
        if probe.missing and all("box_corner_embeddings" in key for key in probe.missing):
            report = load_checkpoint(network, path, strict=False, allow_pickle=allow_pickle)
            if report.unexpected or report.shape_mismatches:
                raise ValueError(
                    f"checkpoint {str(path)!r} does not match {type(network).__name__}: {report.describe()}"
                )
            return report
    return load_checkpoint(network, path, strict=strict, allow_pickle=allow_pickle)


def with_weights(
    network: nn.Module, path: str | os.PathLike | None, start: bool = False, allow_pickle: bool = False
) -> nn.Module:
    """``network`` with ``path`` loaded by :func:`load_weights` (strictly), the report logged; for bundle configs.
    With ``start`` (a starting point for training), no ``path`` (None or empty) leaves the network as built: training
    from scratch. Without ``start`` a path is required: a network to run is never left with random weights."""
    if not path:
        if start:
            logger.info("no starting weights given: the network trains from its initialisation")
            return network
        raise ValueError("no weights file given (ckpt_path is empty): give the checkpoint the network should run with")
    report = load_weights(network, path, start=start, allow_pickle=allow_pickle)
    logger.info(f"loaded {path}{' as a starting point' if start else ''}: {report.describe()}")
    return network
