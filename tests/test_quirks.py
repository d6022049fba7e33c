"""The behaviours the released weights depend on (reference §1). Each test fails if the quirk is "fixed"."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SMALL_SETTINGS, randomize_

from custom.networks import build_sam_med3d


@pytest.fixture(scope="module")
def model():
    return randomize_(build_sam_med3d("sam_med3d", **SMALL_SETTINGS), seed=5).eval()


def _fourier(gaussian: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    p = 2 * math.pi * ((2 * coords - 1) @ gaussian)
    return torch.cat([p.sin(), p.cos(), p.sin()], dim=-1)


def test_dense_pe_swaps_axes_0_and_1(model):
    pe_layer = model.prompt_encoder.pe_layer
    gaussian = pe_layer.positional_encoding_gaussian_matrix
    grid = (4, 4, 4)
    dense = model.prompt_encoder.dense_pe(grid)[0]  # (C, 4, 4, 4)
    for i0, i1, i2 in [(0, 3, 1), (2, 1, 0), (3, 0, 2)]:
        swapped = _fourier(gaussian, torch.tensor([(i1 + 0.5) / 4, (i0 + 0.5) / 4, (i2 + 0.5) / 4]))
        plain = _fourier(gaussian, torch.tensor([(i0 + 0.5) / 4, (i1 + 0.5) / 4, (i2 + 0.5) / 4]))
        torch.testing.assert_close(dense[:, i0, i1, i2], swapped)
        assert not torch.allclose(dense[:, i0, i1, i2], plain, atol=1e-3)


def test_points_are_not_swapped_and_sin_block_repeats(model):
    pe_layer = model.prompt_encoder.pe_layer
    gaussian = pe_layer.positional_encoding_gaussian_matrix
    coords = torch.tensor([[[10.0, 50.0, 3.0]]])
    encoded = pe_layer.points(coords, (64, 64, 64))[0, 0]
    expected = _fourier(gaussian, torch.tensor([10.5, 50.5, 3.5]) / 64)
    torch.testing.assert_close(encoded, expected)
    third = encoded.shape[0] // 3
    torch.testing.assert_close(encoded[:third], encoded[2 * third :])


def test_padding_point_always_appended(model):
    prompt = model.prompt_encoder
    coords = torch.tensor([[[5.0, 6.0, 7.0], [20.0, 30.0, 40.0]]])
    labels = torch.tensor([[1, 0]])
    tokens = prompt.embed_points(coords, labels, (64, 64, 64))
    assert tokens.shape == (1, 3, 48)
    torch.testing.assert_close(tokens[0, 2], prompt.not_a_point_embed.weight[0])
    gaussian = prompt.pe_layer.positional_encoding_gaussian_matrix
    torch.testing.assert_close(
        tokens[0, 0], _fourier(gaussian, torch.tensor([5.5, 6.5, 7.5]) / 64) + prompt.point_embeddings[1].weight[0]
    )
    torch.testing.assert_close(
        tokens[0, 1], _fourier(gaussian, torch.tensor([20.5, 30.5, 40.5]) / 64) + prompt.point_embeddings[0].weight[0]
    )


def test_padding_label_ignores_coordinates(model):
    embedding = torch.randn(1, 48, 4, 4, 4)
    with torch.no_grad():
        a, _ = model.decode(embedding, torch.tensor([[[5.0, 5, 5], [1.0, 2, 3]]]), torch.tensor([[1, -1]]))
        b, _ = model.decode(embedding, torch.tensor([[[5.0, 5, 5], [60.0, 9, 33]]]), torch.tensor([[1, -1]]))
        c, _ = model.decode(embedding, torch.tensor([[[5.0, 5, 5]]]), torch.tensor([[1]]))
    torch.testing.assert_close(a, b)
    # a padding token is still a token: it changes the attention (the released weights saw exactly one)
    assert not torch.allclose(a, c, atol=1e-4)


def test_first_click_uses_zero_mask_not_no_mask_embedding(model):
    embedding = torch.randn(1, 48, 4, 4, 4)
    coords, labels = torch.tensor([[[30.0, 31, 32]]]), torch.tensor([[1]])
    with torch.no_grad():
        default, _ = model.decode(embedding, coords, labels)
        zeros, _ = model.decode(embedding, coords, labels, torch.zeros(1, 1, 16, 16, 16))
        prompt = model.prompt_encoder
        sparse = prompt.embed_points(coords, labels, (64, 64, 64))
        no_mask = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(1, -1, 4, 4, 4)
        untrained, _ = model.mask_decoder(embedding, prompt.dense_pe((4, 4, 4)), sparse, no_mask)
    torch.testing.assert_close(default, zeros)
    assert not torch.allclose(default, untrained, atol=1e-4)
    # the zero mask is not a zero dense prompt either: it goes through mask_downscaling
    assert prompt.embed_mask(torch.zeros(1, 1, 16, 16, 16)).abs().max() > 1e-3
