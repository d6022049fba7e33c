"""The full-resolution variants: click maps, the stem, the decoder's resolution, encode-once caching, and the
dense positional encoding without the released weights' axis swap."""

from __future__ import annotations

import math

import pytest
import torch

from custom.networks import build_sam_med3d
from custom.networks.click_maps import clear_negative_cells, render_click_maps
from custom.networks.sam_med3d_fullres import ImageFeatures
from custom.predictor import VolumetricPredictor

SMALL = dict(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, prompt_embed_dim=48, decoder_mlp_dim=64)


def test_click_maps_are_gaussians_at_the_clicks_by_label():
    coords = torch.tensor([[[3.0, 4.0, 5.0], [10.0, 2.0, 7.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 0, -1]])
    maps = render_click_maps(coords, labels, (12, 8, 9), sigma=1.5)
    assert maps.shape == (1, 2, 12, 8, 9)
    # independent: the formula at two voxels, written out
    for channel, (centre, voxel) in enumerate((((3, 4, 5), (4, 6, 5)), ((10, 2, 7), (9, 2, 8)))):
        squared = sum((a - b) ** 2 for a, b in zip(centre, voxel))
        assert maps[0, channel][voxel].item() == pytest.approx(math.exp(-squared / (2 * 1.5**2)), rel=1e-5)
        assert maps[0, channel][centre].item() == pytest.approx(1.0)
    far = math.exp(-57 / (2 * 1.5**2))  # the other click, 57 squared voxels away: only its tail
    assert maps[0, 0][10, 2, 7].item() == pytest.approx(far, rel=1e-4) and maps[0, 1][3, 4, 5].item() == pytest.approx(
        far, rel=1e-4
    )
    only_padding = render_click_maps(coords[:, 2:], labels[:, 2:], (12, 8, 9))
    assert only_padding.abs().max() == 0  # padding draws nothing


def test_overlapping_clicks_take_the_maximum_and_many_clicks_fit():
    coords = torch.tensor([[[4.0, 4.0, 4.0]] * 40])
    maps = render_click_maps(coords, torch.ones(1, 40, dtype=torch.long), (8, 8, 8))
    assert maps.max().item() == pytest.approx(1.0)


def test_negative_clicks_clear_the_yes_of_the_previous_logits_in_their_cells():
    torch.manual_seed(0)
    previous = torch.randn(2, 1, 7, 6, 5) * 3
    coords = torch.tensor([[[1.0, 1, 1], [5, 4, 3], [6, 5, 4]], [[2, 2, 2], [0, 0, 0], [3, 3, 3]]])
    labels = torch.tensor([[1, 0, -1], [1, -1, 1]])  # item 1: no negative click (padding takes no cell)
    cleared = clear_negative_cells(previous, coords, labels)
    # independent: each voxel's nearest real click, voxel by voxel
    for b in range(2):
        for voxel in torch.cartesian_prod(*(torch.arange(s) for s in previous.shape[2:])).tolist():
            distances = [sum((v - c) ** 2 for v, c in zip(voxel, coords[b, n].tolist())) for n in range(3)]
            to_label = {
                lab: min([d for d, x in zip(distances, labels[b].tolist()) if x == lab], default=1e9) for lab in (0, 1)
            }
            in_negative_cell = to_label[0] < to_label[1]  # strictly nearer to a negative click
            value = previous[(b, 0, *voxel)].item()
            expected = min(value, 0.0) if in_negative_cell else value
            assert cleared[(b, 0, *voxel)].item() == pytest.approx(expected)
    assert (cleared[0] < previous[0]).any() and torch.equal(cleared[1], previous[1])
    assert clear_negative_cells(previous, None, None) is previous


def test_a_network_that_clears_negative_cells_answers_a_negative_click_on_its_previous_mask():
    """With the rule on, decode sees the previous mask without the negative click's cell: the same as giving the
    cleared logits to a network without the rule."""
    torch.manual_seed(0)
    plain = build_sam_med3d("sam_med3d_lite_fullres_clickmaps", negative_clicks_clear=False, **SMALL).eval()
    clearing = build_sam_med3d("sam_med3d_lite_fullres_clickmaps", **SMALL).eval()  # the variant clears
    clearing.load_state_dict(plain.state_dict())
    coords, labels = torch.tensor([[[20.0, 20, 20], [44, 44, 44]]]), torch.tensor([[1, 0]])
    previous = torch.full((1, 1, 64, 64, 64), 5.0)
    with torch.no_grad():
        features = plain.encode(torch.randn(1, 1, 64, 64, 64))
        got, _ = clearing.decode(features, coords, labels, previous)
        same, _ = plain.decode(features, coords, labels, clear_negative_cells(previous, coords, labels))
        unchanged, _ = plain.decode(features, coords, labels, previous)
    assert torch.allclose(got, same)
    assert not torch.allclose(got, unchanged)
    assert clearing.negative_clicks_clear and not build_sam_med3d("sam_med3d_lite_fullres").negative_clicks_clear


@pytest.mark.parametrize("name", ["sam_med3d_lite_fullres", "sam_med3d_lite_fullres_clickmaps"])
def test_full_resolution_variants_predict_every_voxel_of_the_window(name):
    model = build_sam_med3d(name, **SMALL).eval()
    crop = torch.randn(2, 1, 64, 64, 64)
    with torch.no_grad():
        features = model.encode(crop)
        assert isinstance(features, ImageFeatures)
        assert features.embedding.shape == (2, 48, 8, 8, 8)
        assert [tuple(s.shape[1:]) for s in features.skips] == [(16, 64, 64, 64), (48, 32, 32, 32), (96, 16, 16, 16)]
        coords, labels = torch.tensor([[[30.0, 31, 32]]] * 2), torch.tensor([[1]] * 2)
        logits, _ = model.decode(features, coords, labels)
        assert logits.shape == (2, 1, 64, 64, 64)
        again, _ = model.decode(features, coords, labels, logits)  # previous logits at full resolution
        assert again.shape == logits.shape
        with pytest.raises(ValueError, match="mask_input"):
            model.decode(features, coords, labels, torch.zeros(2, 1, 32, 32, 32))


def test_click_maps_reach_the_full_resolution_stage():
    """The decoder's stages read the click maps where they are: with the same tokens and coarse prompt, a map that
    differs only around one voxel changes the logits there and nowhere far from it."""
    torch.manual_seed(0)
    model = build_sam_med3d("sam_med3d_lite_fullres_clickmaps", **SMALL).eval()
    with torch.no_grad():
        features = model.encode(torch.randn(1, 1, 64, 64, 64))
        coords, labels = torch.tensor([[[32.0, 32, 32]]]), torch.tensor([[1]])
        dense_input = model.dense_prompt_input(coords, labels, torch.zeros(1, 1, 64, 64, 64))
        sparse, dense = model.prompt_encoder(coords, labels, dense_input, (64, 64, 64))
        pe = model.prompt_encoder.dense_pe((8, 8, 8))
        moved = dense_input.clone()
        moved[:, 2] = render_click_maps(torch.tensor([[[10.0, 50, 20]]]), torch.tensor([[0]]), (64, 64, 64))[:, 1]
        base, _ = model.mask_decoder(features.embedding, pe, sparse, dense, features.skips, dense_input)
        changed, _ = model.mask_decoder(features.embedding, pe, sparse, dense, features.skips, moved)
    change = (changed - base).abs()[0, 0]
    assert change[9:12, 49:52, 19:22].min() > 0
    assert change[40:, :30, 40:].max() == 0


def test_the_dense_encoding_follows_the_variant_axis_convention():
    swapped = build_sam_med3d("sam_med3d_lite", **SMALL)
    plain = build_sam_med3d("sam_med3d_lite", dense_pe_axis_swap=False, **SMALL)
    plain.prompt_encoder.pe_layer.load_state_dict(swapped.prompt_encoder.pe_layer.state_dict())
    a, b = swapped.prompt_encoder.dense_pe((4, 6, 5))[0], plain.prompt_encoder.dense_pe((4, 6, 5))[0]
    assert b.shape == a.shape == (48, 4, 6, 5)
    # the unswapped encoding of a cell equals a point's encoding at that cell's centre (same frame as clicks)
    point = plain.prompt_encoder.pe_layer.points(torch.tensor([[[1.0, 2.0, 3.0]]]), (4, 6, 5))[0, 0]
    assert torch.allclose(b[:, 1, 2, 3], point, atol=1e-5)
    assert not torch.allclose(a[:, 1, 2, 3], point, atol=1e-3)
    assert not build_sam_med3d("sam_med3d_lite_fullres_clickmaps", **SMALL).prompt_encoder.pe_layer.swap_dense_axes
    assert build_sam_med3d("sam_med3d").prompt_encoder.pe_layer.swap_dense_axes


class _Counting(torch.nn.Module):
    def __init__(self, network):
        super().__init__()
        self.network, self.encodes, self.decodes = network, 0, 0
        self.img_size = network.img_size
        self.patch_size = network.patch_size

    def logits_size(self, grid):
        return self.network.logits_size(grid)

    def encode(self, crop):
        self.encodes += 1
        return self.network.encode(crop)

    def decode(self, *args):
        self.decodes += 1
        return self.network.decode(*args)


def test_a_further_click_runs_only_the_prompt_path():
    from monai.data import MetaTensor

    network = _Counting(build_sam_med3d("sam_med3d_lite_fullres_clickmaps", **SMALL).eval())
    predictor = VolumetricPredictor(network, spacing_mm=1.5, max_windows=1, click_memory="all")
    image = MetaTensor(torch.rand(1, 40, 40, 40), affine=torch.diag(torch.tensor([1.5, 1.5, 1.5, 1.0])))
    predictor.set_image(image)
    predictor.add_click("a", [20, 20, 20], True)
    predictor.add_click("a", [22, 18, 21], False)
    predictor.add_click("a", [18, 22, 19], True)
    assert network.encodes == 1 and network.decodes == 3
