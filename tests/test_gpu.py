"""CUDA against CPU: the encoder, a prompt step, an inference and a bf16 training step (skipped without CUDA).

Run on a GPU machine with ``bash bundle/scripts/gpu_check.sh`` (which also measures training throughput).
"""

from __future__ import annotations

import pytest
import torch
from helpers import REPO_ROOT, randomize_

from custom.networks import build_sam_med3d, load_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).abs().max() / b.float().abs().max()).item()


def test_encoder_and_prompt_step_agree_with_the_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    network = randomize_(build_sam_med3d("sam_med3d"), seed=1).eval()
    image = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(0))
    points, labels = torch.tensor([[[64.0, 60.0, 70.0], [20.0, 90.0, 40.0]]]), torch.tensor([[1, 0]])
    with torch.no_grad():
        cpu_embedding = network.encode(image)
        cpu_logits, _ = network.decode(cpu_embedding, points, labels, None)
        gpu = network.cuda()
        gpu_embedding = gpu.encode(image.cuda())
        gpu_logits, _ = gpu.decode(gpu_embedding, points.cuda(), labels.cuda(), None)
    assert _relative(gpu_embedding, cpu_embedding) < 1e-4
    assert _relative(gpu_logits, cpu_logits) < 1e-4


def test_inference_on_the_gpu_matches_the_cpu():
    from custom.predictor import VolumetricPredictor

    network = build_sam_med3d("sam_med3d_lite").eval()
    load_weights(network, REPO_ROOT / "bundle/models/model.pt")
    sample = str(REPO_ROOT / "bundle/sample/images/openkbp_pt_243.nii.gz")
    masks = []
    for device in ("cpu", "cuda"):
        predictor = VolumetricPredictor(network.to(device), intensity_clamp_by_modality={"CT": (-1000, 1000)})
        predictor.set_image(sample, modality="CT")
        masks.append(predictor.add_click("brainstem", (69, 64, 33), positive=True).clone())
    agreement = (masks[0] == masks[1]).float().mean().item()
    assert masks[0].any() and agreement > 0.999


def test_a_bf16_training_step_on_the_gpu():
    from monai.losses import DiceCELoss

    from custom.engines import InteractiveSegmentation, parameter_groups, trainable

    network = trainable(build_sam_med3d("sam_med3d_small")).cuda()
    model = InteractiveSegmentation(network, num_click_steps=3, mask_only_step_range=(2, 2))
    optimizer = torch.optim.AdamW(parameter_groups(network, 1e-4), weight_decay=0.1)
    image = torch.randn(2, 1, 128, 128, 128, device="cuda")
    target = torch.zeros_like(image)
    target[:, :, 40:80, 40:80, 40:80] = 1
    before = network.mask_decoder.iou_token.weight.detach().clone()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(image, target, torch.Generator().manual_seed(0))
    loss = sum(DiceCELoss(sigmoid=True, squared_pred=True)(step.float(), target) for step in logits)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, network.mask_decoder.iou_token.weight)
