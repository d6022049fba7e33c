"""The exported encode and prompt-step programs reproduce the eager network."""

from __future__ import annotations

import torch
from helpers import randomize_

from custom.networks import build_sam_med3d
from custom.networks.export import export_network, save_programs


def test_exported_programs_match_eager(tmp_path):
    network = randomize_(build_sam_med3d("sam_med3d_tiny", image_size=64), seed=9).eval()
    encode, prompt = export_network(network)
    encode_path, prompt_path = save_programs(encode, prompt, tmp_path)
    encode, prompt = torch.export.load(encode_path).module(), torch.export.load(prompt_path).module()
    image = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        embedding = network.encode(image)
        torch.testing.assert_close(encode(image), embedding, rtol=1e-5, atol=1e-5)
        previous = torch.randn(1, 1, 16, 16, 16)
        for n in (1, 3, 7):  # the number of clicks is dynamic
            clicks = 63 * torch.rand(1, n, 3)
            labels = torch.randint(0, 2, (1, n))
            expected = network.decode(embedding, clicks, labels, previous)
            for ours, theirs in zip(prompt(embedding, clicks, labels, previous), expected):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_full_resolution_programs_match_eager(tmp_path):
    from custom.networks.sam_med3d_fullres import ImageFeatures

    small = dict(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, prompt_embed_dim=48, decoder_mlp_dim=64)
    network = randomize_(build_sam_med3d("sam_med3d_lite_fullres_clickmaps", **small), seed=3).eval()
    encode_path, prompt_path = save_programs(*export_network(network), tmp_path)
    encode, prompt = torch.export.load(encode_path).module(), torch.export.load(prompt_path).module()
    image = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        features = network.encode(image)
        exported = encode(image)
        for ours, theirs in zip(exported, (features.embedding, *features.skips)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        previous = torch.randn(1, 1, 64, 64, 64)
        for n in (1, 4):
            clicks, labels = 63 * torch.rand(1, n, 3), torch.randint(0, 2, (1, n))
            expected = network.decode(ImageFeatures(features.embedding, features.skips), clicks, labels, previous)
            for ours, theirs in zip(prompt(exported[0], clicks, labels, previous, tuple(exported[1:])), expected):
                torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
