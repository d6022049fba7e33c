"""Convert any checkpoint that ``custom.networks.load_weights`` accepts into this bundle's training format,
``{"model": state_dict, "rel_pos_bias": ..., "dense_pe_axis_swap": ...}``, or (``--bare True``) into a bare state
dict for a bundle's ``models/model.pt``, whose conventions then go into the bundle's ``configs/metadata.json``
(the script prints them).

The result loads with ``torch.load(weights_only=True)``, so it is safe to share. Examples::

    python bundle/scripts/convert_checkpoint.py --src sam_med3d_turbo.pth --dst bundle/models/sam_med3d_turbo.pt \
        --network_name sam_med3d
    python bundle/scripts/convert_checkpoint.py --src runs/train/model.pt --dst bundle/models/model.pt \
        --network_name sam_med3d_lite_fullres_clickmaps --dtype float16 --bare True
"""

from __future__ import annotations

import fire
import torch

from custom.networks import build_sam_med3d
from custom.networks.checkpoint import (
    DENSE_PE_AXIS_SWAP_KEY,
    REL_POS_BIAS_KEY,
    CheckpointFile,
    check_conventions,
    compare_state_dicts,
    open_checkpoint,
    save_atomic,
)
from custom.networks.common import as_flag
from custom.networks.image_encoder import REL_POS_BIASES


def convert(
    src: str,
    dst: str,
    network_name: str | None = None,
    allow_pickle: bool = False,
    dtype: str | None = None,
    rel_pos_bias: str | None = None,
    dense_pe_axis_swap: bool | str | None = None,
    bare: bool | str = False,
) -> str:
    """Write ``dst`` from ``src``.

    Args:
        src: the file to convert (upstream training file, bare state dict or ``{"model": ...}``).
        dst: the file to write (atomically).
        network_name: when given, check strictly that the weights fit this registered variant, its
            relative-position bias included.
        allow_pickle: read ``src`` with ``weights_only=False`` (older upstream files; trusted sources only).
        dtype: store floating-point tensors as ``"float16"`` or ``"bfloat16"`` (half the size; loading into a
            float32 network casts them back).
        rel_pos_bias: the relative-position bias the weights were trained with, recorded in ``dst``. Default:
            what ``src`` records, else ``"upstream"`` (a file that records none comes from the upstream code).
            Give ``"decomposed"`` for a ``sam_med3d_lite`` file written before the record existed.
        dense_pe_axis_swap: whether the weights were trained with the released weights' axis swap in the dense
            positional encoding. Default: what ``src`` records, else true (the upstream code's).
        bare: write a bare state dict (a bundle's ``models/model.pt``); its conventions are printed, for the
            bundle's ``configs/metadata.json``.

    Returns:
        ``dst``.
    """
    checkpoint = open_checkpoint(src, allow_pickle=allow_pickle)
    bias = rel_pos_bias or checkpoint.effective_rel_pos_bias
    if bias not in REL_POS_BIASES:
        raise ValueError(f"rel_pos_bias must be one of {REL_POS_BIASES}, got {bias!r}")
    if checkpoint.rel_pos_bias is not None and checkpoint.rel_pos_bias != bias:
        raise ValueError(f"{src!r} records rel_pos_bias={checkpoint.rel_pos_bias!r}; it cannot be relabelled {bias!r}")
    declared_swap = checkpoint.dense_pe_axis_swap
    if dense_pe_axis_swap is not None:
        swap = as_flag(dense_pe_axis_swap, "dense_pe_axis_swap")
        if declared_swap is not None and declared_swap != swap:
            raise ValueError(f"{src!r} records dense_pe_axis_swap={declared_swap}; it cannot be relabelled {swap}")
        declared_swap = swap
    swap = checkpoint.effective_dense_pe_axis_swap if declared_swap is None else declared_swap
    state = checkpoint.state
    if network_name is not None:
        network = build_sam_med3d(network_name)
        declared = CheckpointFile(state, rel_pos_bias or checkpoint.rel_pos_bias, src, declared_swap, src)
        check_conventions(network, declared)
        report = compare_state_dicts(network.state_dict(), state)
        if not report.ok:
            raise ValueError(f"checkpoint {src!r} does not match {network_name!r}: {report.describe()}")
    if dtype is not None:
        target = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    conventions = {REL_POS_BIAS_KEY: bias, DENSE_PE_AXIS_SWAP_KEY: swap}
    save_atomic(state if as_flag(bare, "bare") else {"model": state, **conventions}, dst)
    torch.load(dst, map_location="cpu", weights_only=True)
    print(f"wrote {dst}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values, {conventions}")
    if as_flag(bare, "bare"):
        print(f"a bare state dict: record {conventions} in the bundle's configs/metadata.json")
    return dst


if __name__ == "__main__":
    fire.Fire(convert)
