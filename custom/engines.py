"""Ignite iterations for interactive training and click-simulating validation (reference §4).

Training: the image is encoded once; ``num_click_steps`` decoder steps follow, each with one new click
drawn uniformly from the error region of the previous prediction (positive on a missed voxel, negative on a
false positive) and the previous low-res logits as mask prompt (not detached). Two steps pass no click (one
at a random step in ``mask_only_step_range`` and the last). The loss sums over all steps.

The whole simulated interaction is one ``forward`` of :class:`InteractiveSegmentation`, so that a
``DistributedDataParallel`` wrapper around it sees every parameter use and all-reduces the gradients.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CheckpointLoader
from monai.utils import CommonKeys as Keys
from torch import nn

from .files import write_text_atomic
from .networks.checkpoint import checkpoint_payload, save_atomic
from .networks.sam_med3d import upsample_logits
from .precision import autocast, check_autocast_dtype
from .prompts import simulated_click, uniform_error_click


def simulate_clicks(
    prediction: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One new click per volume: ``(B, D, H, W)`` bool prediction and target -> coords ``(B, 1, 3)``, labels
    ``(B, 1)``; a volume already segmented perfectly gets a padding point (label -1)."""
    coords = torch.zeros(prediction.shape[0], 1, 3, device=prediction.device)
    labels = torch.full((prediction.shape[0], 1), -1, dtype=torch.long, device=prediction.device)
    for b in range(prediction.shape[0]):
        click = uniform_error_click(prediction[b], target[b], generator)
        if click is not None:
            coords[b, 0], labels[b, 0] = click[0].to(coords.device), click[1]
    return coords, labels


class InteractiveSegmentation(nn.Module):
    """One forward = one simulated interaction: ``(image, target) -> logits of every step``.

    Args:
        network: a promptable network (``encode`` / ``decode``), e.g. :class:`custom.networks.SamMed3D`.
        num_click_steps: decoder steps.
        mask_only_step_range: inclusive range of the random step that passes no click.
        last_step_mask_only: whether the last step passes no click either.
    """

    def __init__(
        self,
        network: nn.Module,
        num_click_steps: int = 11,
        mask_only_step_range: Sequence[int] = (2, 8),
        last_step_mask_only: bool = True,
    ) -> None:
        super().__init__()
        self.network = network
        self.num_click_steps = num_click_steps
        self.mask_only_step_range = tuple(mask_only_step_range)
        self.last_step_mask_only = last_step_mask_only

    def forward(
        self, image: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(B, 1, D, H, W)`` image and float target -> logits ``(steps, B, 1, D, H, W)``."""
        embedding = self.network.encode(image)
        truth = target[:, 0] > 0.5
        prediction = torch.zeros_like(truth)
        lo, hi = self.mask_only_step_range
        random_mask_step = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        low_res, outputs = None, []
        for step in range(self.num_click_steps):
            mask_only = step > 0 and (
                step == random_mask_step or (self.last_step_mask_only and step == self.num_click_steps - 1)
            )
            coords, labels = (None, None) if mask_only else simulate_clicks(prediction, truth, generator)
            low_res, _ = self.network.decode(embedding, coords, labels, low_res)
            logits = upsample_logits(low_res, image.shape[2:])
            outputs.append(logits)
            prediction = logits.detach()[:, 0] > 0
        return torch.stack(outputs)


class InteractiveTrainingStep:
    """``iteration_update`` for ``SupervisedTrainer``: the simulated interaction, the summed loss, gradient
    accumulation, autocast and (fp16) gradient scaling.

    ``engine.network`` is an :class:`InteractiveSegmentation` (possibly inside DDP).

    Args:
        accumulation_steps: optimizer step every this many iterations (and at the end of each epoch).
        autocast_dtype: ``"bfloat16"``, ``"float16"`` or None.
        scaler: a ``torch.amp.GradScaler`` (enabled for fp16 on GPU); part of the resumable state.
        seed: base seed of the click draws (combined with the iteration, so a resumed run draws alike).
    """

    def __init__(
        self,
        accumulation_steps: int = 1,
        autocast_dtype: str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        seed: int = 0,
    ) -> None:
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.accumulation_steps = accumulation_steps
        self.autocast_dtype = check_autocast_dtype(autocast_dtype)
        self.scaler = scaler
        self.seed = seed

    def __call__(self, engine: SupervisedTrainer, batchdata: dict) -> dict:
        image, target = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[:2]
        iteration = engine.state.iteration
        position = (iteration - 1) % engine.state.epoch_length
        if position % self.accumulation_steps == 0:
            engine.optimizer.zero_grad(set_to_none=True)
        engine.network.train()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
        with autocast(image.device, self.autocast_dtype):
            step_logits = engine.network(image, target, generator)
        loss = sum(engine.loss_function(logits.float(), target) for logits in step_logits)
        scaled = loss / self.accumulation_steps
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if (position + 1) % self.accumulation_steps == 0 or position + 1 == engine.state.epoch_length:
            if self.scaler is not None:
                self.scaler.step(engine.optimizer)
                self.scaler.update()
            else:
                engine.optimizer.step()
        return {Keys.IMAGE: image, Keys.LABEL: target, Keys.PRED: step_logits[-1].detach(), Keys.LOSS: loss.item()}


class ClickValidationStep:
    """``iteration_update`` for ``SupervisedEvaluator``: simulated clicks answered by the volumetric predictor,
    as in inference and evaluation, on each validation image; the binary prediction after each click in
    ``report_clicks`` is kept as ``pred_<k>``.

    Args:
        inferer: the predictor's settings (:class:`~custom.inferer.PromptedInferer`).
        report_clicks: click counts to report, e.g. ``(1, 5)``.
        protocol: a name of :data:`custom.prompts.CLICK_PROTOCOLS`.
        seed: the clicks of item ``i`` are seeded with ``seed + i``: every validation sees the same clicks.
    """

    def __init__(
        self, inferer: Any, report_clicks: Sequence[int] = (1, 5), protocol: str = "uniform", seed: int = 0
    ) -> None:
        self.inferer = inferer
        self.report_clicks = sorted(set(int(k) for k in report_clicks))
        self.protocol = protocol
        self.seed = seed

    def __call__(self, engine: SupervisedEvaluator, batchdata: dict) -> dict:
        image, target = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[:2]
        network = engine.network.module if hasattr(engine.network, "module") else engine.network
        network = network.network if isinstance(network, InteractiveSegmentation) else network
        predictor = self.inferer.predictor(network)
        affines = image.affine if isinstance(image, MetaTensor) else None
        predictions: dict[int, list[torch.Tensor]] = {k: [] for k in self.report_clicks}
        with engine.mode(network):
            for b in range(image.shape[0]):
                affine = affines[b] if affines is not None and affines.ndim == 3 else affines
                if affine is None:
                    affine = torch.diag(torch.tensor([*predictor.spacing_mm, 1.0], dtype=torch.float64))
                values = image[b].as_tensor() if isinstance(image, MetaTensor) else image[b]
                predictor.set_image(MetaTensor(values.cpu(), affine=affine))
                truth = (target[b, 0].as_tensor() if isinstance(target, MetaTensor) else target[b, 0]).cpu() > 0.5
                generator = torch.Generator().manual_seed(self.seed + engine.state.iteration * 1_000 + b)
                prediction = torch.zeros_like(truth)
                for click_index in range(1, self.report_clicks[-1] + 1):
                    click = simulated_click(self.protocol, prediction, truth, click_index, generator)
                    if click is not None:
                        prediction = predictor.add_click("target", click[0].tolist(), bool(click[1])).clone()
                    if click_index in predictions:
                        predictions[click_index].append(prediction)
                predictor.reset()
        output = {Keys.IMAGE: image, Keys.LABEL: target}
        for k, masks in predictions.items():
            output[f"pred_{k}"] = torch.stack(masks)[:, None].float().to(target.device)
        return output


def parameter_groups(
    network: nn.Module, lr: float, decoder_lr_factor: float = 0.1, freeze_image_encoder: bool = False
) -> list[dict]:
    """AdamW groups: the image encoder at ``lr`` (or frozen), prompt encoder and decoder at ``lr * factor``.

    Parameters a network names in ``frozen_parameter_names()`` (the frozen 2D backbone of ``medsam3d_adapter``)
    stay frozen and out of the groups.
    """
    keep_frozen = set(network.frozen_parameter_names()) if hasattr(network, "frozen_parameter_names") else set()
    encoder = [p for n, p in network.image_encoder.named_parameters() if f"image_encoder.{n}" not in keep_frozen]
    for param in encoder:
        param.requires_grad_(not freeze_image_encoder)
    rest = [p for name, p in network.named_parameters() if not name.startswith("image_encoder.")]
    groups = [{"params": rest, "lr": lr * decoder_lr_factor}]
    if not freeze_image_encoder:
        groups.insert(0, {"params": encoder, "lr": lr})
    return groups


def freeze_untrained_heads(network: nn.Module) -> nn.Module:
    """Stop gradients to the parts the interactive training never uses (``no_mask_embed``, the hypernetworks of
    mask tokens 1-3, the IoU head), so that DDP can all-reduce without ``find_unused_parameters``."""
    for name, param in network.named_parameters():
        unused = (
            name.startswith("prompt_encoder.no_mask_embed.")
            or name.startswith("mask_decoder.iou_prediction_head.")
            or (
                name.startswith("mask_decoder.output_hypernetworks_mlps.")
                and not name.startswith("mask_decoder.output_hypernetworks_mlps.0.")
            )
        )
        if unused:
            param.requires_grad_(False)
    return network


class SaveLatestCheckpoint:
    """Trainer handler: after every epoch, ``<output_dir>/model_latest.pt`` (``checkpoint_payload``) and
    ``<output_dir>/training_state.pt`` (network, optimizer, scheduler, trainer, scaler: what ``--resume``
    loads), each written atomically.

    Args:
        output_dir: the run's folder.
        network: the promptable network (not a wrapper).
        state_objects: name -> object with ``state_dict()`` for the resumable state; the trainer it is
            attached to is added as ``trainer``.
    """

    def __init__(self, output_dir: str, network: nn.Module, state_objects: dict) -> None:
        self.output_dir = Path(output_dir)
        self.network = network
        self.state_objects = state_objects

    def attach(self, engine) -> None:
        self.state_objects = dict(self.state_objects, trainer=engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        save_atomic(checkpoint_payload(self.network), self.output_dir / "model_latest.pt")
        state = {name: obj.state_dict() for name, obj in self.state_objects.items() if obj is not None}
        save_atomic(state, self.output_dir / "training_state.pt")


class ResumeTrainingState(CheckpointLoader):
    """``CheckpointLoader`` for ``training_state.pt`` that also restores the trainer it is attached to
    (epoch, iteration), which a config cannot name inside the trainer's own handler list."""

    def attach(self, engine) -> None:
        self.load_dict = dict(self.load_dict, trainer=engine)
        super().attach(engine)


class SaveBestModel:
    """Evaluator handler: ``<output_dir>/model.pt`` (``checkpoint_payload``) whenever the key metric
    improves, with the metric in ``model.json`` beside it."""

    def __init__(self, output_dir: str, network: nn.Module) -> None:
        self.output_dir = Path(output_dir)
        self.network = network

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        if engine.state.best_metric_epoch != engine.state.epoch:
            return
        previous = self.output_dir / "model.json"
        if previous.is_file() and json.loads(previous.read_text())["best_metric"] >= engine.state.best_metric:
            return  # a resumed run's evaluator forgets earlier bests: the file remembers them
        save_atomic(checkpoint_payload(self.network), self.output_dir / "model.pt")
        summary = {
            "epoch": engine.state.epoch,
            "key_metric": engine.state.key_metric_name,
            "best_metric": float(engine.state.best_metric),
            "metrics": {k: float(v) for k, v in engine.state.metrics.items()},
        }
        write_text_atomic(self.output_dir / "model.json", json.dumps(summary, indent=2))
