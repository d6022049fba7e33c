"""Ignite iterations for interactive training and click-simulating validation (reference §4).

Training: the image is encoded once; ``num_click_steps`` decoder steps follow, each with one new click
drawn uniformly from the error region of the previous prediction (positive on a missed voxel, negative on a
false positive) and the previous low-res logits as mask prompt (not detached). Two steps pass no click (one
at a random step in ``mask_only_step_range`` and the last). The loss sums over all steps.

The whole simulated interaction is one ``forward`` of :class:`InteractiveSegmentation`, so that a
``DistributedDataParallel`` wrapper around it sees every parameter use and all-reduces the gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines import IterationEvents, SupervisedEvaluator, SupervisedTrainer
from monai.utils import CommonKeys as Keys
from torch import nn

from .cases import box_from_challenge
from .interaction import simulate_interaction
from .networks.common import as_flag
from .networks.sam_med3d import mask_prompt_logits, upsample_logits
from .precision import autocast, check_autocast_dtype
from .predictor import VolumetricPredictor
from .prompts import challenge_box, check_click_memory, mask_box, simulated_click
from .seeding import seeded_generator

logger = logging.getLogger(__name__)


def simulate_clicks(
    prediction: torch.Tensor,
    target: torch.Tensor,
    generator: torch.Generator | None,
    protocol: str = "uniform",
    click_index: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One new click per volume: ``(B, D, H, W)`` bool prediction and target -> coords ``(B, 1, 3)``, labels
    ``(B, 1)`` (a named protocol of :data:`custom.prompts.CLICK_PROTOCOLS`); a volume already segmented
    perfectly gets a padding point (label -1)."""
    coords = torch.zeros(prediction.shape[0], 1, 3, device=prediction.device)
    labels = torch.full((prediction.shape[0], 1), -1, dtype=torch.long, device=prediction.device)
    for b in range(prediction.shape[0]):
        click = simulated_click(protocol, prediction[b], target[b], click_index, generator)
        if click is not None:
            coords[b, 0], labels[b, 0] = click[0].to(coords.device), click[1]
    return coords, labels


def simulate_boxes(target: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One box per volume as its two corner points: ``(B, D, H, W)`` bool target -> coords ``(B, 2, 3)``, labels
    ``(B, 2)`` (``BOX_MIN``, ``BOX_MAX``; padding for an empty target). Half of the boxes are the target's 3D
    extent with a random margin of up to 5 % of the window per side, half the CVPR 2025 challenge's box
    widened by 0 to 6 voxels per 256 of the window."""
    from .networks.prompt_encoder import BOX_MAX, BOX_MIN

    b, *size = target.shape
    coords = torch.zeros(b, 2, 3, device=target.device)
    labels = torch.full((b, 2), -1, dtype=torch.long, device=target.device)
    for i in range(b):
        if not target[i].any():
            continue
        if float(torch.rand((), generator=generator)) < 0.5:
            extent = torch.tensor(mask_box(target[i].cpu()), dtype=torch.float32)  # (3, 2): [lo, hi) per axis
            first, last = extent[:, 0], extent[:, 1] - 1
            spread = torch.rand(2, 3, generator=generator) * 0.05 * torch.tensor(size, dtype=torch.float32)
            low = (first - spread[0]).clamp(min=0)
            high = torch.minimum(last + spread[1], torch.tensor(size, dtype=torch.float32) - 1)
        else:
            widen = int(torch.randint(0, round(6 * max(size) / 256) + 1, (1,), generator=generator))
            # training windows are RAS-oriented: the axial axis is the last
            box = challenge_box(target[i], widen, axial_axis=2)
            low, high = (torch.tensor(c) for c in box_from_challenge(box, axial_axis=2))
        coords[i] = torch.stack([low, high]).to(coords.device)
        labels[i] = torch.tensor([BOX_MIN, BOX_MAX])
    return coords, labels


class InteractiveSegmentation(nn.Module):
    """One forward = one simulated interaction: ``(image, target) -> logits of every step``.

    Args:
        network: a promptable network (``encode`` / ``decode``), e.g. :class:`custom.networks.SamMed3D`.
        num_click_steps: decoder steps.
        mask_only_step_range: inclusive range of the random step that passes no click (upstream: ``(2, 8)``);
            None: no such step.
        last_step_mask_only: whether the last step passes no click either (upstream: True).
        click_memory: what a step gets besides the previous logits (:data:`custom.prompts.CLICK_MEMORIES`):
            ``"newest"`` click (upstream's training) or ``"all"`` clicks so far; inference must use the same.
        click_protocol: how the clicks are drawn (:data:`custom.prompts.CLICK_PROTOCOLS`; upstream: uniform).
        detach_previous: cut the gradient through the previous step's logits (upstream keeps it).
        box_probability: how often the first prompt is a box instead of a click (networks built with
            ``box_prompts`` only): half of them a 3D box of the target's extent with a random margin, half the
            CVPR 2025 challenge's box (a 2D box on the middle foreground slice and the z range), widened by 0 to 6
            voxels per 256.
        mask_only_weight: the loss weight of a step without a click, relative to a click step's 1 (see
            :meth:`step_weights`).
        wrong_prior_probability: how often an interaction starts from an earlier mask that wrongly holds a
            neighbouring region too (:func:`wrong_earlier_mask`), given as the first step's mask prompt as the
            predictor gives ``set_mask``'s (:func:`~custom.networks.sam_med3d.mask_prompt_logits`): the simulated
            clicks then include negative ones on that region, for a negative click to learn to remove what an
            earlier mask holds (one CPU run with 0.3 did not get there: model card, "Shipped model"; default off).
        prior_logit: the magnitude of that mask prompt's logits (the predictor's ``prev_mask_logit``).
        correction_weight: in an interaction that starts from such a wrong earlier mask, the second click is
            negative, uniform in the part of the wrongly held region the first step still predicts, and the loss
            of the step that answers it weighs ``correction_weight`` times a click step (1: no forced negative
            click; the second click is drawn by the protocol). Measured against an equal-budget control with 0.5
            and 3: the negative click got weaker, not stronger (model card, "Shipped model"); off by default.
    """

    def __init__(
        self,
        network: nn.Module,
        num_click_steps: int = 11,
        mask_only_step_range: Sequence[int] | None = (2, 8),
        last_step_mask_only: bool = True,
        click_memory: str = "newest",
        click_protocol: str = "uniform",
        detach_previous: bool = False,
        box_probability: float = 0.0,
        mask_only_weight: float = 1.0,
        wrong_prior_probability: float = 0.0,
        prior_logit: float = 4.0,
        correction_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if correction_weight < 0:
            raise ValueError(f"correction_weight must be >= 0, got {correction_weight}")
        if not 0 <= wrong_prior_probability <= 1:
            raise ValueError(f"wrong_prior_probability must be in [0, 1], got {wrong_prior_probability}")
        if box_probability > 0 and not getattr(getattr(network, "prompt_encoder", None), "box_prompts", False):
            raise ValueError("box_probability > 0 needs a network built with box_prompts=True (box embeddings)")
        if mask_only_weight < 0:
            raise ValueError(f"mask_only_weight must be >= 0, got {mask_only_weight}")
        self.box_probability = float(box_probability)
        self.network = network
        self.num_click_steps = num_click_steps
        self.mask_only_step_range = tuple(mask_only_step_range) if mask_only_step_range is not None else None
        self.last_step_mask_only = as_flag(last_step_mask_only, "last_step_mask_only")
        self.click_memory = check_click_memory(click_memory)
        self.click_protocol = click_protocol
        self.detach_previous = detach_previous
        self.mask_only_weight = float(mask_only_weight)
        self.wrong_prior_probability = float(wrong_prior_probability)
        self.prior_logit = float(prior_logit)
        self.correction_weight = float(correction_weight)

    def mask_only_steps(self, generator: torch.Generator | None) -> set[int]:
        """The steps of one interaction that pass no click (drawn from ``generator``)."""
        steps = set()
        if self.mask_only_step_range is not None:
            lo, hi = self.mask_only_step_range
            steps.add(int(torch.randint(lo, hi + 1, (1,), generator=generator)))
        if self.last_step_mask_only and self.num_click_steps > 1:
            steps.add(self.num_click_steps - 1)
        steps.discard(0)
        return steps

    def step_weights(self, mask_only: set[int], correction_step: int | None = None) -> torch.Tensor:
        """``(steps,)`` loss weights summing to 1: each click step 1, each mask-only step ``mask_only_weight``
        and the ``correction_step`` (a forced negative click) ``correction_weight`` (before normalising), so that
        the loss is a weighted mean over steps and the click steps carry it."""
        weights = torch.tensor(
            [self.mask_only_weight if step in mask_only else 1.0 for step in range(self.num_click_steps)]
        )
        if correction_step is not None:
            weights[correction_step] = self.correction_weight
        return weights / weights.sum()

    def forward(
        self,
        image: torch.Tensor,
        target: torch.Tensor,
        generator: torch.Generator | None = None,
        first_click: torch.Tensor | None = None,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, D, H, W)`` image and float target -> logits ``(steps, B, 1, D, H, W)`` (and, with
        ``return_weights``, the ``(steps,)`` loss weights of :meth:`step_weights`).

        ``first_click`` ``(B, 3)``: voxel indices of the first (positive) click of each item, where the training
        window was placed around it (:class:`custom.transforms.CropAroundClickd`); an item whose click does not
        fall on its target after resampling gets a click of the protocol instead. None: every click simulated.
        """
        embedding = self.network.encode(image)
        truth = target[:, 0] > 0.5
        prediction = torch.zeros_like(truth)
        mask_only_steps = self.mask_only_steps(generator)
        low_res, outputs, wrongly_held, correction_step = None, [], None, None
        # drawn only when enabled, so that runs without it draw the same clicks as before it existed
        if (
            self.wrong_prior_probability > 0
            and float(torch.rand((), generator=generator)) < self.wrong_prior_probability
        ):
            prior = torch.stack([wrong_earlier_mask(t, generator) for t in truth])[:, None]
            low_res = mask_prompt_logits(self.network, prior, embedding.shape[2:], self.prior_logit).to(image.dtype)
            if self.correction_weight != 1.0 and self.num_click_steps > 1 and 1 not in mask_only_steps:
                wrongly_held, correction_step = prior[:, 0] & ~truth, 1
        history: list[tuple[torch.Tensor, torch.Tensor]] = []
        clicks = 0
        for step in range(self.num_click_steps):
            if step in mask_only_steps:
                coords, labels = None, None
            else:
                clicks += 1
                box_first = step == 0 and self.box_probability > 0
                if box_first and float(torch.rand((), generator=generator)) < self.box_probability:
                    history.append(simulate_boxes(truth, generator))
                else:
                    coords, labels = simulate_clicks(prediction, truth, generator, self.click_protocol, clicks)
                    if step == correction_step:
                        coords, labels = _negative_clicks_in(prediction & wrongly_held, coords, labels, generator)
                    if step == 0 and first_click is not None:
                        coords, labels = _given_first_clicks(first_click, truth, coords, labels)
                    history.append((coords, labels))
                chosen = history[-1:] if self.click_memory == "newest" else history
                coords = torch.cat([c for c, _ in chosen], dim=1)
                labels = torch.cat([label for _, label in chosen], dim=1)
            previous = low_res.detach() if self.detach_previous and low_res is not None else low_res
            low_res, _ = self.network.decode(embedding, coords, labels, previous)
            logits = upsample_logits(low_res, image.shape[2:])
            outputs.append(logits)
            prediction = logits.detach()[:, 0] > 0
        logits = torch.stack(outputs)
        return (logits, self.step_weights(mask_only_steps, correction_step)) if return_weights else logits


def _negative_clicks_in(
    region: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A negative click uniform in each item's ``(B, D, H, W)`` bool ``region``; items with an empty region keep
    their ``coords`` ``(B, 1, 3)`` / ``labels`` ``(B, 1)``."""
    # the region as a prediction against an empty truth: the uniform protocol's false positives are the region
    forced, forced_labels = simulate_clicks(region, torch.zeros_like(region), generator)
    kept = (forced_labels < 0)[..., None]  # padding: an empty region
    return torch.where(kept, coords, forced), torch.where(kept[..., 0], labels, forced_labels)


def wrong_earlier_mask(target: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """An earlier mask that holds the target and wrongly a neighbouring region too: ``(D, H, W)`` bool target ->
    the target united with a copy of it shifted along a random axis, either way, by 50-100 % of its extent there
    (a neighbouring part of the same shape, such as the other half of a hippocampus); an empty target stays
    empty."""
    if not target.any():
        return target.clone()
    axis = int(torch.randint(0, 3, (1,), generator=generator))
    lo, hi = mask_box(target)[axis]
    extent = hi - lo
    shift = max(1, round(extent * (0.5 + 0.5 * float(torch.rand((), generator=generator)))))
    shift = min(shift, target.shape[axis] - 1) * (1 if float(torch.rand((), generator=generator)) < 0.5 else -1)
    shifted = torch.roll(target, shift, dims=axis)
    wrapped = [slice(None)] * 3
    wrapped[axis] = slice(0, shift) if shift > 0 else slice(shift, None)
    shifted[tuple(wrapped)] = False  # what the roll brought round from the far end
    return target | shifted


def _given_first_clicks(
    first_click: torch.Tensor, truth: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The given first clicks ``(B, 3)`` as positive clicks where they fall on their target (rounded to a voxel),
    the simulated ``coords``/``labels`` elsewhere."""
    coords, labels = coords.clone(), labels.clone()
    size = torch.tensor(truth.shape[1:], device=first_click.device)
    for b in range(truth.shape[0]):
        voxel = first_click[b].round().long()
        if bool(((voxel >= 0) & (voxel < size)).all()) and bool(truth[b][tuple(voxel.tolist())]):
            coords[b, 0] = first_click[b].to(coords)
            labels[b, 0] = 1
    return coords, labels


#: the batch key of the first click's voxel indices, where the training window was placed around it
FIRST_CLICK = "first_click"


class InteractiveTrainingStep:
    """``iteration_update`` for ``SupervisedTrainer``: the simulated interaction, the loss (a weighted mean over its
    steps, :meth:`InteractiveSegmentation.step_weights`), gradient accumulation, autocast and (fp16) gradient
    scaling. A batch's ``first_click`` (:class:`custom.transforms.CropAroundClickd`) is the interaction's first click.

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
        generator = seeded_generator(self.seed, iteration)
        steps = (position + 1) % self.accumulation_steps == 0 or position + 1 == engine.state.epoch_length
        # a micro-step of gradient accumulation under DDP keeps its gradients local: one all-reduce per step
        local = engine.network.no_sync() if not steps and hasattr(engine.network, "no_sync") else nullcontext()
        first_click = batchdata.get(FIRST_CLICK)
        if isinstance(first_click, torch.Tensor):
            first_click = first_click.to(image.device)
        with local:
            with autocast(image.device, self.autocast_dtype):
                step_logits, weights = engine.network(image, target, generator, first_click, return_weights=True)
            loss = sum(w * engine.loss_function(logits.float(), target) for w, logits in zip(weights, step_logits))
            scaled = loss / self.accumulation_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if steps:
            if self.scaler is not None:
                self.scaler.step(engine.optimizer)
                self.scaler.update()
            else:
                engine.optimizer.step()
        engine.state.output = {
            Keys.IMAGE: image,
            Keys.LABEL: target,
            Keys.PRED: step_logits[-1].detach(),
            Keys.LOSS: loss.detach(),
        }
        # as MONAI's own iteration does: the engine's decollation and post-processing run on this event, so
        # handlers read the output the MONAI way (``from_engine(["loss"], first=True)``, MLflow included)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class ClickValidationStep:
    """``iteration_update`` for ``SupervisedEvaluator``: simulated clicks answered by the volumetric predictor,
    as in inference and evaluation, on each validation image; the binary prediction after each click in
    ``report_clicks`` is kept as ``pred_<k>``.

    Args:
        predictor: makes the predictor for a network, ``predictor(network)`` (its settings bound), as
            :class:`~custom.inferer.PromptedInferer` takes it.
        report_clicks: click counts to report, e.g. ``(1, 5)``.
        protocol: a name of :data:`custom.prompts.CLICK_PROTOCOLS`.
        seed: with the item's case and class, seeds its clicks: every validation sees the same clicks, whatever
            the order and the process (under DDP each rank validates its share).
    """

    def __init__(
        self,
        predictor: Callable[[nn.Module], VolumetricPredictor] = VolumetricPredictor,
        report_clicks: Sequence[int] = (1, 5),
        protocol: str = "uniform",
        seed: int = 0,
    ) -> None:
        self.predictor = predictor
        self.report_clicks = sorted(set(int(k) for k in report_clicks))
        self.protocol = protocol
        self.seed = seed

    def __call__(self, engine: SupervisedEvaluator, batchdata: dict) -> dict:
        image, target = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[:2]
        network = engine.network.module if hasattr(engine.network, "module") else engine.network
        network = network.network if isinstance(network, InteractiveSegmentation) else network
        predictor = self.predictor(network)
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
                generator = seeded_generator(self.seed, _item_key(batchdata, b))
                steps = simulate_interaction(
                    predictor, "target", truth, self.report_clicks[-1], self.protocol, generator
                )
                for step in steps:
                    if step.index in predictions:
                        predictions[step.index].append(step.mask.clone())
                predictor.reset()
        output = {Keys.IMAGE: image, Keys.LABEL: target}
        for k, masks in predictions.items():
            output[f"pred_{k}"] = torch.stack(masks)[:, None].float().to(target.device)
        return output


def mean_of_metrics(metrics: Sequence[Any]) -> Any:
    """The mean of Ignite metrics, as one metric: the key metric that needs Dice after the first click and after
    later ones alike (a checkpoint whose clicks add nothing cannot win on first-click Dice alone)."""
    from ignite.metrics import MetricsLambda

    return MetricsLambda(lambda *values: sum(float(v) for v in values) / len(values), *metrics)


def metric_difference(later: Any, earlier: Any) -> Any:
    """``later - earlier`` of two Ignite metrics, as one metric (the Dice gained by the clicks between them)."""
    from ignite.metrics import MetricsLambda

    return MetricsLambda(lambda a, b: float(a) - float(b), later, earlier)


def _item_key(batchdata: dict, b: int) -> int | str:
    """A key (:func:`custom.seeding.seed_value`) that identifies item ``b`` of a batch by its case and class (its
    position if it has neither)."""
    case = batchdata.get("case")
    target = batchdata.get("target_class")
    if case is None:
        return b
    name = case[b] if isinstance(case, (list, tuple)) else str(case)
    value = int(target[b]) if target is not None else 0
    return f"{name}/{value}"


def parameter_groups(network: nn.Module, lr: float, decoder_lr_factor: float = 0.1) -> list[dict]:
    """AdamW groups of the parameters that train (see :func:`trainable`): the image encoder's at ``lr``, the
    prompt encoder's and decoder's at ``lr * decoder_lr_factor``. (MONAI's ``generate_param_groups`` puts every
    unmatched parameter, frozen ones included, in its last group.)"""
    named = [(name, p) for name, p in network.named_parameters() if p.requires_grad]
    encoder = [p for name, p in named if name.startswith("image_encoder.")]
    rest = [p for name, p in named if not name.startswith("image_encoder.")]
    groups = [{"params": rest, "lr": lr * decoder_lr_factor}]
    if encoder:
        groups.insert(0, {"params": encoder, "lr": lr})
    return groups


def untrained_parameter_names(network: nn.Module) -> list[str]:
    """The parameters the interactive training never uses: ``no_mask_embed`` (a mask prompt is always given),
    the hypernetworks of mask tokens 1-3 and the IoU head (only the single-mask output is trained), and a
    network's own frozen ones (``frozen_parameter_names()``: the frozen 2D backbone of ``medsam3d_adapter``)."""
    own = set(network.frozen_parameter_names()) if hasattr(network, "frozen_parameter_names") else set()
    names = []
    for name, _ in network.named_parameters():
        unused = (
            name.startswith("prompt_encoder.no_mask_embed.")
            or name.startswith("mask_decoder.iou_prediction_head.")
            or (
                name.startswith("mask_decoder.output_hypernetworks_mlps.")
                and not name.startswith("mask_decoder.output_hypernetworks_mlps.0.")
            )
        )
        if unused or name in own:
            names.append(name)
    return names


def trainable(network: nn.Module, freeze_image_encoder: bool = False) -> nn.Module:
    """``network`` with ``requires_grad`` off for what does not train (:func:`untrained_parameter_names`, and
    the whole image encoder with ``freeze_image_encoder``), set once before any wrapper (DDP registers its
    gradient hooks on the parameters that train when it wraps them, and all-reduces without
    ``find_unused_parameters``). (MONAI's ``freeze_layers`` takes one regular expression and warns for every
    parameter it turns back on; this sets both ways from the names.)"""
    freeze_image_encoder = as_flag(freeze_image_encoder, "freeze_image_encoder")
    frozen = set(untrained_parameter_names(network))
    for name, param in network.named_parameters():
        encoder = name.startswith("image_encoder.")
        param.requires_grad_(name not in frozen and not (freeze_image_encoder and encoder))
    return network
