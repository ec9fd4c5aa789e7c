"""The DPO step timed in-process through the trainer's own code: `build_trainer`, `training_batches`, `train_step`.

Why in-process rather than one trainer CLI per variant: a variant then costs its model build and its steps, not an
interpreter start, imports and a UNet export; with a 15-minute device lease that decides how many variants fit.
The path measured is the CLI's (same builder, same loader, same step); only the CLI's checkpointing and export are
left out. Every optimizer step ends with one host sync (trainer/step.py), so host time is device time.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from schemas.config import TrainConfig
from trainer.checkpoint import TrainState
from trainer.model import Models
from trainer.speed import attention_backend
from trainer.step import Trainer, micro_batch_loss, train_step, with_noise
from trainer.train import build_trainer, make_accelerator, training_batches


@dataclass(frozen=True)
class StepMeasure:
    pairs_per_s: float
    first_steps_s: float  # the warm-up steps: compilation, autotuning, the loader's first shards
    data_wait_fraction: float
    peak_gib: float | None  # torch.cuda.max_memory_allocated over the whole variant; None on a CPU
    flops_per_pair: float | None  # counted in the first step when asked (FlopCounterMode)
    # compiled variants: relative L2 distance of the compiled step's gradient from the same module run eagerly
    gradient_vs_eager: float | None


def release_device_memory() -> None:
    """Between variants: compiled graphs hold their inputs' storage, and the allocator its cache."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure_step(
    cfg: TrainConfig, *, steps: int, warmup: int, count_flops: bool = False, models: Models | None = None
) -> StepMeasure:
    """Steady pairs/s of `steps` optimizer steps after `warmup` (at least 2: the first compiles, the second may
    still meet a new graph); with `count_flops`, the first warm-up step runs under FlopCounterMode, which counts
    every matmul, convolution and attention of the step: policy forward and backward, reference forward.
    `models`: built in memory (the flow architectures) instead of loaded from cfg.model."""
    accelerator = make_accelerator(cfg)
    release_device_memory()
    flops = None
    with attention_backend(cfg.attention_backend):
        trainer = build_trainer(cfg, accelerator, models=models)
        batches = training_batches(cfg, accelerator, 0)
        state = TrainState()
        start = time.perf_counter()
        for i in range(warmup):
            if count_flops and i == 0:
                with FlopCounterMode(display=False) as counter:
                    train_step(trainer, state, batches)
                flops = counter.get_total_flops() / cfg.batch_size
            else:
                train_step(trainer, state, batches)
        first_steps_s = time.perf_counter() - start
        start = time.perf_counter()
        wait = 0.0
        for _ in range(steps):
            wait += train_step(trainer, state, batches).data_wait_s
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        drift = gradient_vs_eager(trainer, next(batches)) if cfg.compile else None
    del trainer, batches
    accelerator.free_memory()
    release_device_memory()
    return StepMeasure(steps * cfg.batch_size / seconds, first_steps_s, wait / seconds, peak, flops, drift)


def gradient_vs_eager(trainer: Trainer, batch: dict) -> float:
    """One micro-batch through the compiled modules and again through the same modules forced eager
    (`torch.compiler.set_stance`): how far compilation moved the gradient (bf16 rounding: ~1e-2; a wrong kernel:
    order 1, as torch 2.13's CPU inductor gives the UNet without this project's work-around)."""
    batch = with_noise(batch, trainer, 0)
    gradients = []
    for stance in ("default", "force_eager"):
        trainer.optimizer.zero_grad(set_to_none=True)
        with torch.compiler.set_stance(stance):
            loss, _ = micro_batch_loss(trainer, batch)
            trainer.accelerator.backward(loss)
        params = [p for p in trainer.models.policy.parameters() if p.grad is not None]
        gradients.append(torch.cat([p.grad.float().flatten() for p in params]))
    trainer.optimizer.zero_grad(set_to_none=True)
    compiled, eager = gradients
    return float((compiled - eager).norm() / eager.norm())
