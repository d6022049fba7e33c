"""The training path (encode once, click steps with the previous logits, a mask-only step) trains every
parameter it uses, and exactly the ones upstream never trained are left without gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import randomize_

from custom.networks import build_sam_med3d, upsample_logits


def test_gradients_reach_every_used_parameter():
    torch.manual_seed(0)
    model = randomize_(build_sam_med3d("sam_med3d_tiny", image_size=64), seed=2).train()
    image = torch.randn(2, 1, 64, 64, 64)
    target = (torch.rand(2, 1, 64, 64, 64) > 0.7).float()
    embedding = model.encode(image)
    low_res = None
    loss = 0.0
    steps = [
        (torch.tensor([[[10.0, 20, 30]], [[40.0, 41, 42]]]), torch.tensor([[1], [1]])),
        (torch.tensor([[[11.0, 2, 3]], [[4.0, 5, 6]]]), torch.tensor([[0], [1]])),
        (None, None),
    ]
    for coords, labels in steps:
        low_res, _ = model.decode(embedding, coords, labels, low_res)
        loss = loss + F.binary_cross_entropy_with_logits(upsample_logits(low_res, image.shape[2:]), target)
    loss.backward()

    without_grad = {name for name, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)}
    never_trained = {
        "prompt_encoder.no_mask_embed.weight",
        *{
            f"mask_decoder.output_hypernetworks_mlps.{i}.layers.{j}.{kind}"
            for i in (1, 2, 3)
            for j in range(3)
            for kind in ("weight", "bias")
        },
        *{f"mask_decoder.iou_prediction_head.layers.{j}.{kind}" for j in range(3) for kind in ("weight", "bias")},
    }
    assert without_grad == never_trained
    # mask tokens 1-3 are not outputs, but the other tokens attend to them: they do get gradient
    assert torch.all(model.mask_decoder.mask_tokens.weight.grad.abs().sum(dim=1) > 0)
