"""The registry builds the released configuration exactly and smaller variants on request."""

from __future__ import annotations

import pytest
import torch
from plain_reference import REFERENCE_CONFIG, expected_parameter_count, expected_state_dict_shapes

from custom.networks import available_networks, build_medsam3d, build_sam_med3d
from custom.networks.image_encoder import REL_POS_BIASES
from custom.networks.registry import SAM_MED3D_VARIANTS, VARIANTS, build_sam


def _parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_released_configuration_keys_shapes_and_count():
    model = build_sam_med3d("sam_med3d")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected_state_dict_shapes(REFERENCE_CONFIG)
    assert len(shapes) == 324
    assert _parameter_count(model) == expected_parameter_count(REFERENCE_CONFIG) == 100_509_232
    assert _parameter_count(model.image_encoder) == 92_924_928
    assert _parameter_count(model.prompt_encoder) == 8_668
    assert _parameter_count(model.mask_decoder) == 7_575_636
    for prefix, count in (("image_encoder.", 189), ("prompt_encoder.", 15), ("mask_decoder.", 120)):
        assert sum(k.startswith(prefix) for k in shapes) == count


def test_cpu_variants_are_small_and_run():
    assert {"sam_med3d", "sam_med3d_small", "sam_med3d_tiny"} <= set(available_networks())
    assert _parameter_count(build_sam_med3d("sam_med3d_small")) <= 20_000_000
    model = build_sam_med3d("sam_med3d_tiny").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 128, 128, 128), torch.tensor([[[64.0, 64, 64]]]), torch.tensor([[1]]))
    assert out.shape == (1, 1, 128, 128, 128) and torch.isfinite(out).all()


def test_size_overrides():
    model = build_sam_med3d(
        "sam_med3d_tiny", image_size=64, encoder_depth=2, encoder_global_attn_indexes=(1,), window_size=6
    )
    sd = model.state_dict()
    assert sd["image_encoder.pos_embed"].shape == (1, 4, 4, 4, 192)
    assert sd["image_encoder.blocks.0.attn.rel_pos_d"].shape == (11, 64)  # windowed: 2 * 6 - 1
    assert sd["image_encoder.blocks.1.attn.rel_pos_d"].shape == (7, 64)  # global: 2 * 4 - 1
    assert "image_encoder.blocks.2.norm1.weight" not in sd
    embedding = model.encode(torch.randn(1, 1, 64, 64, 64))
    assert embedding.shape == (1, 96, 4, 4, 4)
    low_res, iou = model.decode(embedding, torch.tensor([[[3.0, 4, 5]]]), torch.tensor([[1]]))
    assert low_res.shape == (1, 1, 16, 16, 16) and iou.shape == (1, 1)


def test_registry_errors_name_the_value():
    with pytest.raises(KeyError, match="sam_med3d_tiny"):
        build_sam_med3d("sam_med3d_huge")
    with pytest.raises(TypeError, match="encoder_dpeth"):
        build_sam_med3d("sam_med3d_tiny", encoder_dpeth=3)
    with pytest.raises(ValueError, match=r"\(1, 7\)"):
        build_sam_med3d("sam_med3d_tiny", encoder_global_attn_indexes=(1, 7))
    assert isinstance(SAM_MED3D_VARIANTS["sam_med3d"]["encoder_global_attn_indexes"], tuple)


def test_every_variant_names_its_builder_and_bias():
    assert VARIANTS["medsam3d_adapter"].builder is build_medsam3d
    assert {name for name, v in VARIANTS.items() if v.builder is build_sam} == {
        "sam_med3d",
        "sam_med3d_small",
        "sam_med3d_lite",
        "sam_med3d_tiny",
    }
    assert VARIANTS["sam_med3d"].rel_pos_bias == "upstream"  # the released weights
    assert VARIANTS["sam_med3d_lite"].rel_pos_bias == "decomposed"  # what the shipped model was trained with
    for name, entry in VARIANTS.items():
        assert entry.rel_pos_bias in REL_POS_BIASES, name
    for name in ("sam_med3d_lite", "sam_med3d_tiny"):
        network = build_sam_med3d(name)
        assert network.image_encoder.rel_pos_bias == VARIANTS[name].rel_pos_bias
        assert {b.attn.rel_pos_bias for b in network.image_encoder.blocks} == {VARIANTS[name].rel_pos_bias}
    # the textbook bias is an explicit setting, also for the released structure
    assert build_sam_med3d("sam_med3d_tiny", rel_pos_bias="decomposed").image_encoder.rel_pos_bias == "decomposed"
    with pytest.raises(ValueError, match="rel_pos_bias must be one of"):
        build_sam_med3d("sam_med3d_tiny", rel_pos_bias="textbook")
