"""3DMedSAM (``medsam3d_adapter``): loading a 2D SAM checkpoint, frozen backbone, shapes, learning, workflows."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import CONFIGS, fit_fixed_batch
from monai.bundle import ConfigWorkflow

from custom.engines import parameter_groups, trainable
from custom.networks import (
    MedSAM3D,
    available_networks,
    build_sam_med3d,
    checkpoint_payload,
    load_weights,
    with_weights,
)
from custom.networks.checkpoint import save_atomic

# A narrow, shallow 3DMedSAM for speed; the ViT-B configuration itself is tested once below.
SMALL = dict(
    image_size=32,
    encoder_embed_dim=96,
    encoder_depth=2,
    encoder_num_heads=2,
    adapter_dim=8,
    skip_depths=(2, 1),
    skip_chans=(16, 8),
    prompt_embed_dim=64,
    decoder_heads=4,
    decoder_mlp_dim=128,
)


def sam2d_state_dict(
    dim: int = 768,
    depth: int = 12,
    heads: int = 12,
    global_blocks: tuple[int, ...] = (2, 5, 8, 11),
    prompt: int = 256,
    decoder_mlp: int = 2048,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random state dict with the keys and shapes of segment-anything's ``sam_vit_b`` (written from its
    modeling code, independently of this bundle's modules)."""
    shapes: dict[str, tuple[int, ...]] = {
        "image_encoder.patch_embed.proj.weight": (dim, 3, 16, 16),
        "image_encoder.patch_embed.proj.bias": (dim,),
        "image_encoder.pos_embed": (1, 64, 64, dim),
    }
    for i in range(depth):
        b = f"image_encoder.blocks.{i}."
        rel = 2 * (64 if i in global_blocks else 14) - 1
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,)})
        shapes.update({b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,)})
        shapes.update({b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,)})
        shapes.update({b + "attn.rel_pos_h": (rel, dim // heads), b + "attn.rel_pos_w": (rel, dim // heads)})
        shapes.update({b + "norm2.weight": (dim,), b + "norm2.bias": (dim,)})
        shapes.update({b + "mlp.lin1.weight": (4 * dim, dim), b + "mlp.lin1.bias": (4 * dim,)})
        shapes.update({b + "mlp.lin2.weight": (dim, 4 * dim), b + "mlp.lin2.bias": (dim,)})
    shapes.update(
        {"image_encoder.neck.0.weight": (prompt, dim, 1, 1), "image_encoder.neck.2.weight": (prompt, prompt, 3, 3)}
    )
    for n in (1, 3):
        shapes.update({f"image_encoder.neck.{n}.weight": (prompt,), f"image_encoder.neck.{n}.bias": (prompt,)})
    p = "prompt_encoder."
    shapes[p + "pe_layer.positional_encoding_gaussian_matrix"] = (2, prompt // 2)
    for i in range(4):
        shapes[f"{p}point_embeddings.{i}.weight"] = (1, prompt)
    shapes.update({p + "not_a_point_embed.weight": (1, prompt), p + "no_mask_embed.weight": (1, prompt)})
    for idx, shape in (("0", (4, 1, 2, 2)), ("3", (16, 4, 2, 2)), ("6", (prompt, 16, 1, 1))):
        shapes.update({f"{p}mask_downscaling.{idx}.weight": shape, f"{p}mask_downscaling.{idx}.bias": (shape[0],)})
    for idx, c in (("1", 4), ("4", 16)):
        shapes.update({f"{p}mask_downscaling.{idx}.weight": (c,), f"{p}mask_downscaling.{idx}.bias": (c,)})
    m = "mask_decoder."

    def attention(prefix: str, internal: int) -> None:
        for proj in "qkv":
            shapes.update({f"{prefix}{proj}_proj.weight": (internal, prompt), f"{prefix}{proj}_proj.bias": (internal,)})
        shapes.update({prefix + "out_proj.weight": (prompt, internal), prefix + "out_proj.bias": (prompt,)})

    for layer in range(2):
        t = f"{m}transformer.layers.{layer}."
        attention(t + "self_attn.", prompt)
        attention(t + "cross_attn_token_to_image.", prompt // 2)
        attention(t + "cross_attn_image_to_token.", prompt // 2)
        for n in range(1, 5):
            shapes.update({f"{t}norm{n}.weight": (prompt,), f"{t}norm{n}.bias": (prompt,)})
        shapes.update({t + "mlp.lin1.weight": (decoder_mlp, prompt), t + "mlp.lin1.bias": (decoder_mlp,)})
        shapes.update({t + "mlp.lin2.weight": (prompt, decoder_mlp), t + "mlp.lin2.bias": (prompt,)})
    attention(m + "transformer.final_attn_token_to_image.", prompt // 2)
    shapes.update(
        {m + "transformer.norm_final_attn.weight": (prompt,), m + "transformer.norm_final_attn.bias": (prompt,)}
    )
    shapes.update({m + "iou_token.weight": (1, prompt), m + "mask_tokens.weight": (4, prompt)})
    shapes.update(
        {m + "output_upscaling.0.weight": (prompt, prompt // 4, 2, 2), m + "output_upscaling.0.bias": (prompt // 4,)}
    )
    shapes.update({m + "output_upscaling.1.weight": (prompt // 4,), m + "output_upscaling.1.bias": (prompt // 4,)})
    shapes.update(
        {
            m + "output_upscaling.3.weight": (prompt // 4, prompt // 8, 2, 2),
            m + "output_upscaling.3.bias": (prompt // 8,),
        }
    )
    heads_ = [(f"output_hypernetworks_mlps.{i}", prompt, prompt // 8) for i in range(4)]
    for head, hidden, outs in heads_ + [("iou_prediction_head", 256, 4)]:  # the IoU head is 256 wide in SAM
        for layer, (o, i) in enumerate(((hidden, prompt), (hidden, hidden), (outs, hidden))):
            shapes.update({f"{m}{head}.layers.{layer}.weight": (o, i), f"{m}{head}.layers.{layer}.bias": (o,)})
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def vit_b_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam2d") / "sam_vit_b.pth"
    state = sam2d_state_dict()
    # sam_vit_b_01ec64.pth: 93,735,472 parameters and the 256-entry Fourier buffer.
    assert sum(v.numel() for v in state.values()) == 93_735_472 + 256
    save_atomic(state, path)
    return path, state


def test_vit_b_checkpoint_loads_with_a_correct_report(vit_b_file, caplog):
    path, state2d = vit_b_file
    with caplog.at_level(logging.INFO, logger="custom.networks.medsam3d"):
        model = build_sam_med3d("medsam3d_adapter", sam2d_checkpoint=str(path))
    sd = model.state_dict()
    report = model.load_sam2d_state_dict(state2d, source="again")
    expected_adapted = {
        "image_encoder.patch_embed.proj.weight",
        "image_encoder.pos_embed",
        "image_encoder.neck.0.weight",
        "image_encoder.neck.2.weight",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.mask_downscaling.0.weight",
        "prompt_encoder.mask_downscaling.3.weight",
        "prompt_encoder.mask_downscaling.6.weight",
        "mask_decoder.output_upscaling.0.weight",
        "mask_decoder.output_upscaling.3.weight",
    } | {f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in range(12) for a in "hw"}
    assert set(report.adapted) == expected_adapted
    assert set(report.left_out) == {
        "prompt_encoder.point_embeddings.2.weight",
        "prompt_encoder.point_embeddings.3.weight",
    }
    assert len(report.loaded) + len(report.adapted) + len(report.left_out) == len(state2d)
    assert all(sd[k].shape == state2d[k].shape and torch.equal(sd[k], state2d[k]) for k in report.loaded)
    assert (
        "image_encoder.blocks.11.attn.qkv.weight" in report.loaded and "mask_decoder.iou_token.weight" in report.loaded
    )
    assert all(".adapter." in k or "fuse_" in k or "skip_proj" in k or "depth_pos" in k for k in report.new)
    assert {"image_encoder.blocks.0.adapter.up.weight", "mask_decoder.fuse_2x.weight"} <= set(report.new)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "34 adapted to 3D" in messages and "2 left out" in messages
    trainable, total = model.parameter_counts()
    assert f"{trainable:,} trainable of {total:,} parameters" in messages
    # Frozen = the 12 ViT-B blocks (norms, qkv, proj, MLP, three 15-row tables) and the 8x8 position table.
    frozen = 12 * (4 * 768 + 768 * 2304 + 2304 + 768 * 768 + 768 + 2 * 768 * 3072 + 3072 + 768 + 3 * 15 * 64)
    frozen += 8 * 8 * 768
    assert total - trainable == frozen == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert trainable == 7_875_392 and trainable < 0.1 * total

    # The 3D patch embedding on a volume constant over depth = the 2D kernel on the slice seen at half resolution.
    w2d, b2d = state2d["image_encoder.patch_embed.proj.weight"], state2d["image_encoder.patch_embed.proj.bias"]
    slice_ = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    image2d = F.interpolate(slice_, scale_factor=2, mode="nearest").expand(1, 3, 16, 16)
    volume = slice_[:, :, None].expand(1, 1, 8, 8, 8)
    out3d = model.image_encoder.patch_embed.proj(volume).flatten()
    torch.testing.assert_close(out3d, F.conv2d(image2d, w2d, b2d, stride=16).flatten(), rtol=1e-4, atol=1e-3)
    # Depth table starts as the height table; both resampled from 27 (windowed) or 127 (global) rows to 15.
    for i in (0, 2):
        torch.testing.assert_close(
            sd[f"image_encoder.blocks.{i}.attn.rel_pos_d"], sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"]
        )
        h2d = state2d[f"image_encoder.blocks.{i}.attn.rel_pos_h"]
        torch.testing.assert_close(sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"][7], h2d[(len(h2d) - 1) // 2])
    gauss2d = state2d["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    gauss3d = sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    assert torch.equal(gauss3d[1], gauss2d[1]) and torch.equal(gauss3d[2], gauss2d[0])  # (d, h, w) <- (-, y, x)
    torch.testing.assert_close(
        sd["image_encoder.neck.2.weight"].sum(2), state2d["image_encoder.neck.2.weight"], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        sd["mask_decoder.output_upscaling.0.weight"][:, :, 1], state2d["mask_decoder.output_upscaling.0.weight"]
    )

    # A ViT-B file into a narrower network: the mismatch is named.
    small = build_sam_med3d("medsam3d_adapter", **SMALL)
    with pytest.raises(
        ValueError, match=r"sam_vit_b\.pth: image_encoder\.patch_embed\.proj\.weight of shape \(768, 3, 16, 16\)"
    ):
        with_weights(small, path, start=True)


def test_bad_2d_checkpoints_are_named(tmp_path):
    model = build_sam_med3d("medsam3d_adapter", **SMALL)
    state = sam2d_state_dict(96, 4, 2, (1, 3), prompt=64, decoder_mlp=128)
    del state["mask_decoder.transformer.layers.1.norm3.weight"]
    with pytest.raises(ValueError, match=r"broken\.pth.*1 entries.*layers\.1\.norm3\.weight"):
        model.load_sam2d_state_dict(state, source="broken.pth")
    three_d = tmp_path / "model3d.pt"
    save_atomic({"model": build_sam_med3d("sam_med3d_tiny", image_size=64).state_dict()}, three_d)
    with pytest.raises(ValueError, match=r"model3d\.pt is not a 2D SAM checkpoint.*segment-anything"):
        build_sam_med3d("medsam3d_adapter", sam2d_checkpoint=str(three_d), **SMALL)
    with pytest.raises(ValueError, match=r"model3d\.pt.*does not match MedSAM3D"):  # strict 3D load via train.json
        with_weights(model, three_d, start=True)


def test_registry_and_trained_checkpoint_round_trip(tmp_path):
    assert "medsam3d_adapter" in available_networks()
    with pytest.raises(TypeError, match="fast_window_attention"):
        build_sam_med3d("medsam3d_adapter", fast_window_attention=False)
    with pytest.raises(TypeError, match="adaptor_dim"):
        build_sam_med3d("medsam3d_adapter", adaptor_dim=8)
    model = build_sam_med3d("medsam3d_adapter", **SMALL)
    small2d = tmp_path / "small2d.pth"
    save_atomic(sam2d_state_dict(96, 4, 2, (1, 3), prompt=64, decoder_mlp=128), small2d)
    assert with_weights(model, small2d, start=True) is model
    for name, param in model.named_parameters():  # give the new 3D entries values too
        if ".adapter." in name or "fuse_" in name:
            torch.nn.init.normal_(param.data, std=0.05)
    path = save_atomic(checkpoint_payload(model), tmp_path / "trained.pt")
    again = build_sam_med3d("medsam3d_adapter", **SMALL)
    assert load_weights(again, path).ok  # the strict load inference.json and evaluate.json do
    image, point = torch.randn(1, 1, 32, 32, 32), torch.tensor([[[10.0, 12.0, 20.0]]])
    with torch.no_grad():
        torch.testing.assert_close(
            again.eval()(image, point, torch.tensor([[1]])), model.eval()(image, point, torch.tensor([[1]]))
        )


@pytest.mark.parametrize("crop", [(32, 32, 32), (16, 24, 40), (64, 64, 64)])
def test_output_shapes_for_several_crops(crop):
    model = build_sam_med3d("medsam3d_adapter", **SMALL).eval()
    image = torch.randn(2, 1, *crop)
    with torch.no_grad():
        embedding = model.encode(image)
        grid = [s // 8 for s in crop]
        assert embedding.shape == (2, 64 + 16 + 8, *grid)
        low_res, iou = model.decode(embedding, torch.tensor([[[3.0, 4, 5]], [[8.0, 9, 2]]]), torch.tensor([[1], [0]]))
        assert low_res.shape == (2, 1, *[4 * g for g in grid]) and iou.shape == (2, 1)
        mask_only, _ = model.decode(embedding, None, None, low_res)
        assert mask_only.shape == low_res.shape
        assert model(image, torch.tensor([[[3.0, 4, 5]], [[8.0, 9, 2]]]), torch.tensor([[1], [0]])).shape == (
            2,
            1,
            *crop,
        )
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.randn(1, 1, 30, 32, 32))
    with pytest.raises(ValueError, match="packed embedding of 64 \\+ 16 \\+ 8"):
        model.decode(embedding[:, :64], None, None)


def test_frozen_parameters_get_no_gradient_adapters_and_decoder_do():
    torch.manual_seed(0)
    model = build_sam_med3d("medsam3d_adapter", **SMALL)
    groups = parameter_groups(trainable(model), 1e-3)  # must not unfreeze the backbone
    in_groups = {id(p) for g in groups for p in g["params"]}
    frozen = set(model.frozen_parameter_names())
    assert frozen and all(".blocks." in n or n == "image_encoder.pos_embed" for n in frozen)
    assert not any(".adapter." in n for n in frozen)
    image = torch.randn(1, 1, 32, 32, 32)
    logits = model(image, torch.tensor([[[10.0, 12.0, 20.0]]]), torch.tensor([[1]]))
    logits.square().mean().backward()
    params = dict(model.named_parameters())
    for name in frozen:
        assert not params[name].requires_grad and params[name].grad is None and id(params[name]) not in in_groups
    unused = (
        "prompt_encoder.no_mask_embed.",
        "mask_decoder.iou_prediction_head.",
        "mask_decoder.output_hypernetworks_mlps.",
    )
    for name, param in params.items():
        if name not in frozen and (not name.startswith(unused) or ".mlps.0." in name):
            assert param.requires_grad and id(param) in in_groups and param.grad is not None, name
    for name in (
        "image_encoder.blocks.0.adapter.up.weight",
        "image_encoder.blocks.1.adapter.up.weight",
        "mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
        "mask_decoder.fuse_2x.weight",
        "mask_decoder.fuse_4x.2.weight",
        "image_encoder.patch_embed.proj.weight",
    ):
        assert params[name].grad.abs().sum() > 0, name
    unfrozen = build_sam_med3d("medsam3d_adapter", freeze_backbone=False, **SMALL)
    assert unfrozen.parameter_counts()[0] == unfrozen.parameter_counts()[1]


def test_a_fixed_batch_is_learned():
    torch.manual_seed(0)
    network = build_sam_med3d("medsam3d_adapter", **SMALL)
    target = torch.zeros(2, 1, 32, 32, 32)
    target[0, 0, 8:20, 10:22, 6:18] = 1
    target[1, 0, 14:28, 4:16, 12:30] = 1
    image = torch.randn(2, 1, 32, 32, 32) + 3 * target
    frozen_before = {n: p.detach().clone() for n, p in network.named_parameters() if not p.requires_grad}
    assert frozen_before
    losses = fit_fixed_batch(network, image, target, steps=25)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert all(torch.equal(p, frozen_before[n]) for n, p in network.named_parameters() if n in frozen_before)


def test_train_and_evaluate_workflows_by_overrides(tmp_path):
    small2d = save_atomic(sam2d_state_dict(96, 4, 2, (1, 3), prompt=64, decoder_mlp=128), tmp_path / "sam_small.pth")
    net = {f"network_def#{k}": v for k, v in SMALL.items() if k != "image_size"}
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        workflow_type="train",
        output_dir=str(tmp_path / "train"),
        network_name="medsam3d_adapter",
        pretrained_ckpt=str(small2d),
        epochs=1,
        val_interval=1,
        num_workers=0,
        num_click_steps=3,
        **net,
    )
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network")
    assert isinstance(network, MedSAM3D) and network.img_size == 64
    qkv = network.state_dict()["image_encoder.blocks.1.attn.qkv.weight"]
    expected = sam2d_state_dict(96, 4, 2, (1, 3), prompt=64, decoder_mlp=128)["image_encoder.blocks.1.attn.qkv.weight"]
    workflow.run()
    workflow.finalize()
    assert torch.equal(network.state_dict()["image_encoder.blocks.1.attn.qkv.weight"], expected)  # stayed frozen
    assert torch.equal(qkv, expected)
    trained = tmp_path / "train" / "model_latest.pt"
    assert torch.load(trained, weights_only=True)["rel_pos_bias"] == "decomposed"
    evaluation = ConfigWorkflow(
        config_file=str(CONFIGS / "evaluate.json"),
        workflow_type="infer",
        output_dir=str(tmp_path / "eval"),
        network_name="medsam3d_adapter",
        ckpt_path=str(trained),
        num_clicks=2,
        **net,
    )
    evaluation.initialize()
    evaluation.run()
    evaluation.finalize()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert "dice@1" in json.dumps(summary)
