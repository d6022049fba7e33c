"""Shared test helpers: random weights that exercise every term, and the plain reference's config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# A structure like the released one (windowed blocks padded to a larger window, global blocks), small enough
# for the deliberately slow plain reference: grid 4 padded to windows of 6.
SMALL_SETTINGS = dict(
    image_size=64,
    patch_size=16,
    encoder_embed_dim=48,
    encoder_depth=3,
    encoder_num_heads=3,
    encoder_global_attn_indexes=(1,),
    window_size=6,
    prompt_embed_dim=48,
    decoder_heads=4,
    decoder_mlp_dim=64,
    mask_in_chans=16,
)


def reference_config(settings: dict) -> dict:
    """Registry settings -> the config dict of ``tests/plain_reference.py``."""
    from plain_reference import REFERENCE_CONFIG

    return dict(
        REFERENCE_CONFIG,
        image_size=settings["image_size"],
        patch_size=settings["patch_size"],
        embed_dim=settings["encoder_embed_dim"],
        depth=settings["encoder_depth"],
        num_heads=settings["encoder_num_heads"],
        global_attn_indexes=tuple(settings["encoder_global_attn_indexes"]),
        window_size=settings["window_size"],
        out_chans=settings["prompt_embed_dim"],
        decoder_heads=settings["decoder_heads"],
        decoder_mlp_dim=settings["decoder_mlp_dim"],
        mask_in_chans=settings["mask_in_chans"],
        rel_pos_bias=settings.get("rel_pos_bias", "upstream"),
    )


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (position tables, norms and biases included), in place."""
    from custom.networks.common import LayerNorm3d

    gen = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, LayerNorm3d))}
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if id(param) in norm_weights:
                param.copy_(1 + 0.1 * noise)
            elif "rel_pos" in name:
                param.copy_(0.3 * noise)
            elif "pos_embed" in name or param.ndim == 1:
                param.copy_(0.1 * noise)
            else:
                param.add_(0.02 * noise)
    return model


@pytest.fixture(scope="session")
def full_model():
    """The released configuration with random weights (fast attention), shared by the slow tests."""
    from custom.networks import build_sam_med3d

    return randomize_(build_sam_med3d("sam_med3d"), seed=1).eval()


def fit_fixed_batch(network: torch.nn.Module, image: torch.Tensor, target: torch.Tensor, steps: int) -> list[float]:
    """Train ``network`` on one batch with the interactive training forward (3 click steps, one mask-only)
    and the training loss; returns the loss of every step."""
    from monai.losses import DiceCELoss

    from custom.engines import InteractiveSegmentation, parameter_groups, trainable

    model = InteractiveSegmentation(network, num_click_steps=3, mask_only_step_range=(2, 2))
    optimizer = torch.optim.AdamW(parameter_groups(trainable(network), 2e-3, decoder_lr_factor=1.0), weight_decay=0.1)
    loss_function = DiceCELoss(sigmoid=True, squared_pred=True)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        logits = model(image, target, torch.Generator().manual_seed(step))
        loss = sum(loss_function(step_logits, target) for step_logits in logits)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
