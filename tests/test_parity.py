"""SamMed3D against the independent plain implementation in ``plain_reference.py``, on random weights with
non-zero position tables: embedding and low-res logits agree to 1e-4 relative. The plain reference itself is
checked against numbers the upstream code computed."""

from __future__ import annotations

import pytest
import torch
from helpers import REPO_ROOT, SMALL_SETTINGS, randomize_, reference_config
from plain_reference import REFERENCE_CONFIG, reference_decode, reference_encode, reference_forward

from custom.networks import build_sam_med3d

FIXTURE = REPO_ROOT / "tests" / "data" / "upstream_parity"

TOLERANCE = 1e-4


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def test_released_configuration_matches_reference(full_model):
    gen = torch.Generator().manual_seed(11)
    image = torch.randn(1, 1, 128, 128, 128, generator=gen)
    coords = torch.tensor([[[64.0, 60.0, 70.0], [20.5, 99.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 0, -1]])
    mask_input = 3 * torch.randn(1, 1, 32, 32, 32, generator=gen)
    sd = full_model.state_dict()
    with torch.no_grad():
        embedding = full_model.encode(image)
        expected_embedding = reference_encode(sd, image, REFERENCE_CONFIG)
        assert _relative_error(embedding, expected_embedding) < TOLERANCE
        for mask in (None, mask_input):
            low_res, iou = full_model.decode(embedding, coords, labels, mask)
            expected_low_res, expected_iou = reference_decode(sd, embedding, coords, labels, mask, REFERENCE_CONFIG)
            assert _relative_error(low_res, expected_low_res) < TOLERANCE
            assert _relative_error(iou, expected_iou) < TOLERANCE


@pytest.mark.parametrize("rel_pos_bias", ["upstream", "decomposed"])
@pytest.mark.parametrize("window_size", [6, 3], ids=["one-padded-window", "several-windows"])
def test_small_configuration_matches_reference(window_size, rel_pos_bias):
    settings = dict(SMALL_SETTINGS, window_size=window_size, rel_pos_bias=rel_pos_bias)
    model = randomize_(build_sam_med3d("sam_med3d", **settings), seed=7).eval()
    config = reference_config(settings)
    sd = model.state_dict()
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(2, 1, 64, 64, 64, generator=gen)
    coords = 63 * torch.rand(2, 4, 3, generator=gen)
    labels = torch.tensor([[1, 0, 1, -1], [1, 1, 0, 0]])
    mask_input = torch.randn(2, 1, 16, 16, 16, generator=gen)
    with torch.no_grad():
        embedding = model.encode(image)
        assert _relative_error(embedding, reference_encode(sd, image, config)) < TOLERANCE
        # a mask-only step: no sparse prompt at all
        low_res, _ = model.decode(embedding, None, None, mask_input)
        expected, _ = reference_decode(sd, embedding, None, None, mask_input, config)
        assert _relative_error(low_res, expected) < TOLERANCE
        logits = model(image, coords, labels, mask_input)
        assert _relative_error(logits, reference_forward(sd, image, coords, labels, mask_input, config)) < TOLERANCE


def test_plain_reference_reproduces_the_upstream_numbers():
    # The reference is only worth comparing against if it computes what upstream computes.
    checkpoint = torch.load(FIXTURE / "upstream_tiny.pth", weights_only=True)
    io = torch.load(FIXTURE / "upstream_tiny_io.pt", weights_only=True)
    sd = {k: v.double() for k, v in checkpoint["model_state_dict"].items()}
    config = dict(
        REFERENCE_CONFIG,
        image_size=64,
        patch_size=8,
        embed_dim=192,
        depth=4,
        num_heads=3,
        global_attn_indexes=(1, 3),
        out_chans=96,
    )
    with torch.no_grad():
        embedding = reference_encode(sd, io["image"][:1].double(), config)
    assert _relative_error(embedding, io["embedding"][:1].double()) < 1e-6  # the fixture is stored in float32
