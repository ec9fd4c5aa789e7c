"""One optimizer step: `gradient_accumulation_steps` micro-batches, then one clipped update or a counted skip.

Non-finite detection stays on the device: every micro-batch ANDs `isfinite(loss)` into a device flag, the gradient
norm joins it, and an all-reduce makes the ranks agree. Reading that flag to update or skip is the step's one host
sync; the metrics stay on the device until the logging window reads them. The same all-reduce carries whether any
rank was asked to stop (SIGTERM/SIGINT), so every rank stops after the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch.optim.lr_scheduler import LRScheduler

from schemas.config import TrainConfig
from trainer.checkpoint import TrainState
from trainer.model import Models, draw_noise, pair_forward, reference_forward, to_device
from trainer.objective import Objective, mismatched_errors
from trainer.preemption import StopRequest


@dataclass
class Trainer:
    """What a step needs, built once by `main` and not changed by steps."""

    cfg: TrainConfig
    accelerator: Accelerator
    # the policy itself (models.policy: checkpoints, evaluation, the no-grad passes, LoRA's reference), the
    # scheduler, and the frozen reference (None for LoRA or a loss without one)
    models: Models
    # models.policy as accelerate prepared it (DDP-wrapped on many processes): the training forward and backward
    prepared_policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: LRScheduler
    # the --loss with its resolved hyper-parameters
    objective: Objective
    # "sd15" or "sdxl", from the data's manifest
    family: str
    # set by a signal handler, read once per step
    stop: StopRequest = field(default_factory=StopRequest)


@dataclass
class StepResult:
    # per micro-batch: the loss and the objective's statistics, on the device
    metrics: list[dict[str, torch.Tensor]]
    # total gradient norm before clipping, on the device
    grad_norm: torch.Tensor
    # a loss or gradient was non-finite on some rank, so no update was applied
    skipped: bool
    # some rank was asked to stop: every rank stops after this step
    stop: bool
    seconds: float
    # of `seconds`, spent waiting for the input pipeline
    data_wait_s: float


def train_step(trainer: Trainer, state: TrainState, batches: Iterator[dict]) -> StepResult:
    """Run one optimizer step on the next micro-batches and advance `state`'s counters."""
    cfg, accelerator = trainer.cfg, trainer.accelerator
    start = time.perf_counter()
    data_wait = 0.0
    finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
    metrics = []
    for _ in range(cfg.gradient_accumulation_steps):
        wait_start = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - wait_start
        batch = with_noise(batch, trainer, state.micro_step)
        state.micro_step += 1
        with accelerator.accumulate(trainer.prepared_policy):
            loss, stats = micro_batch_loss(trainer, batch)
            finite &= torch.isfinite(loss)
            accelerator.backward(loss)
        metrics.append({"loss": loss, **stats})
    grad_norm, skipped, stop = apply_gradients(trainer, finite)
    state.global_step += 1
    state.skipped_steps += int(skipped)
    return StepResult(metrics, grad_norm, skipped, stop, time.perf_counter() - start, data_wait)


def with_noise(batch: dict, trainer: Trainer, micro_step: int) -> dict:
    """The batch on the device with its training noise and timesteps, drawn on the host from (seed, rank,
    micro_step) and copied without blocking (pinned on CUDA), so a resumed run draws exactly the same."""
    device = trainer.accelerator.device
    noise, timesteps = draw_noise(
        batch,
        trainer.models.denoising,
        seed=trainer.cfg.seed,
        rank=trainer.accelerator.process_index,
        micro_step=micro_step,
    )
    if device.type == "cuda":
        noise, timesteps = noise.pin_memory(), timesteps.pin_memory()
    return to_device({**batch, "noise": noise, "timesteps": timesteps}, device)


def micro_batch_loss(trainer: Trainer, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective on one micro-batch: the reference pass (no grad) when the loss needs one, KTO's mismatched
    pass when it asks for it, then the policy's."""
    models, objective, accelerator = trainer.models, trainer.objective, trainer.accelerator
    noise, timesteps = batch["noise"], batch["timesteps"]
    with accelerator.autocast():
        ref = (
            reference_forward(models, models.policy, batch, noise, timesteps)
            if objective.needs_reference
            else None
        )
        mismatched = (
            mismatched_errors(models, models.policy, batch, noise, timesteps)
            if objective.needs_mismatched_pass
            else None
        )
        pol = pair_forward(
            trainer.prepared_policy,
            models.denoising,
            batch,
            noise,
            timesteps,
            winners_only=not objective.needs_losers,
        )
    return objective(
        pol,
        ref,
        batch["label"],
        mismatched=mismatched,
        mean_over_processes=lambda x: accelerator.reduce(x, "mean"),
    )


def apply_gradients(trainer: Trainer, finite: torch.Tensor) -> tuple[torch.Tensor, bool, bool]:
    """Clip, then update, or skip the update when any rank saw a non-finite loss or gradient: the replicas must
    agree, or they would diverge. Reading that agreement is the step's one host sync."""
    cfg, accelerator = trainer.cfg, trainer.accelerator
    assert accelerator.sync_gradients, "an optimizer step must end on an accumulation boundary"
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    grad_norm = accelerator.clip_grad_norm_(trainer.prepared_policy.parameters(), max_norm)
    finite = finite & torch.isfinite(grad_norm)
    # torch.full is a fill kernel; torch.tensor(x, device=cuda) would be a second, synchronising host copy
    stop_flag = torch.full((), float(trainer.stop.requested), device=finite.device)
    flags = torch.stack([(~finite).float(), stop_flag])
    skipped, stop = (v != 0 for v in accelerator.reduce(flags, "sum").tolist())
    if not skipped:
        trainer.optimizer.step()
    elif accelerator.scaler is not None:
        # fp16: lower the loss scale, as a scaler skip would
        accelerator.scaler.update()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.lr_scheduler.step()
    return grad_norm, skipped, stop
