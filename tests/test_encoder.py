"""The exact closed form of the padded-window attention, and the encoder's input checks."""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL_SETTINGS, randomize_

from custom.networks import build_sam_med3d


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _encode_both_ways(model, image):
    with torch.no_grad():
        model.image_encoder.set_fast_window_attention(True)
        fast = model.encode(image)
        model.image_encoder.set_fast_window_attention(False)
        try:
            padded = model.encode(image)
        finally:
            model.image_encoder.set_fast_window_attention(True)
    return fast, padded


def test_fast_window_attention_is_exact_on_the_released_configuration(full_model):
    image = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(0))
    fast, padded = _encode_both_ways(full_model, image)
    assert _relative_error(fast, padded) < 1e-5


@pytest.mark.parametrize("rel_pos_bias", ["upstream", "decomposed"])
@pytest.mark.parametrize("shape", [(2, 1, 48, 64, 32), (1, 1, 96, 96, 96)])
def test_fast_window_attention_is_exact_on_other_grids(shape, rel_pos_bias):
    # (3, 4, 2) fits in the window of 6 with padding; (6, 6, 6) fills it exactly (no padded keys). The upstream
    # bias reads queries across the row (at width indices up to the window's side), which for (3, 4, 2) lie in
    # the padding; its global blocks need a cubic grid, so they are left out for the non-cubic input.
    settings = dict(SMALL_SETTINGS, rel_pos_bias=rel_pos_bias)
    if rel_pos_bias == "upstream" and len(set(shape[2:])) > 1:
        settings["encoder_global_attn_indexes"] = ()
    model = randomize_(build_sam_med3d("sam_med3d", **settings), seed=4).eval()
    image = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    fast, padded = _encode_both_ways(model, image)
    assert fast.shape == (shape[0], 48, shape[2] // 16, shape[3] // 16, shape[4] // 16)
    assert _relative_error(fast, padded) < 1e-5


def test_upstream_bias_refuses_a_non_cubic_grid_naming_the_block_and_grid():
    model = build_sam_med3d("sam_med3d", **SMALL_SETTINGS)  # block 1 is global
    with pytest.raises(ValueError, match=r"image_encoder\.blocks\.1: .*cubic.*\(3, 4, 2\)"):
        model.encode(torch.zeros(1, 1, 48, 64, 32))
    decomposed = build_sam_med3d("sam_med3d", **SMALL_SETTINGS, rel_pos_bias="decomposed")
    assert decomposed.encode(torch.zeros(1, 1, 48, 64, 32)).shape == (1, 48, 3, 4, 2)


def test_encoder_rejects_bad_shapes():
    model = build_sam_med3d("sam_med3d", **SMALL_SETTINGS)
    with pytest.raises(ValueError, match=r"\(1, 64, 64, 64\)"):
        model.encode(torch.zeros(1, 64, 64, 64))
    with pytest.raises(ValueError, match="multiples of 16"):
        model.encode(torch.zeros(1, 1, 64, 60, 64))


def test_bf16_autocast_embedding_stays_within_one_percent_of_fp32(full_model):
    image = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = full_model.encode(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            approximate = full_model.encode(image).float()
    assert approximate.dtype == torch.float32 and approximate.shape == exact.shape
    relative_l2 = ((approximate - exact).norm() / exact.norm()).item()
    assert relative_l2 < 1e-2
    # bf16 must actually have been used: an autocast that silently ran in fp32 would agree to ~1e-6
    assert relative_l2 > 1e-4
