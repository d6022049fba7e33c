"""Convert any checkpoint that ``custom.networks.load_checkpoint`` accepts into ``{"model": state_dict}``.

The result loads with ``torch.load(weights_only=True)``, so it is safe to share. Example::

    python bundle/scripts/convert_checkpoint.py --src sam_med3d_turbo.pth --dst bundle/models/sam_med3d_turbo.pt \
        --network_name sam_med3d
"""

from __future__ import annotations

import fire
import torch

from custom.networks import build_sam_med3d, load_checkpoint, read_checkpoint, save_atomic


def convert(
    src: str, dst: str, network_name: str | None = None, allow_pickle: bool = False, dtype: str | None = None
) -> str:
    """Write ``dst`` from ``src``.

    Args:
        src: the file to convert (upstream training file, bare state dict or ``{"model": ...}``).
        dst: the file to write (atomically).
        network_name: when given, check strictly that the weights fit this registered variant.
        allow_pickle: read ``src`` with ``weights_only=False`` (older upstream files; trusted sources only).
        dtype: store floating-point tensors as ``"float16"`` or ``"bfloat16"`` (half the size; loading into a
            float32 network casts them back).

    Returns:
        ``dst``.
    """
    state = read_checkpoint(src, allow_pickle=allow_pickle)
    if dtype is not None:
        target = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    if network_name is not None:
        load_checkpoint(build_sam_med3d(network_name), src, strict=True, allow_pickle=allow_pickle)
    save_atomic({"model": {k: v.contiguous() for k, v in state.items()}}, dst)
    torch.load(dst, map_location="cpu", weights_only=True)
    print(f"wrote {dst}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values")
    return dst


if __name__ == "__main__":
    fire.Fire(convert)
