"""Optimizer and learning-rate schedule, as the official launchers configure them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LambdaLR
from transformers.optimization import Adafactor

from schemas.config import OPTIMIZERS, TrainConfig


def effective_lr(cfg: TrainConfig, num_processes: int) -> float:
    """The official `--scale_lr`: lr × batch × accumulation × processes (1e-8 → 2.048e-5 at batch 2048)."""
    if not cfg.scale_lr:
        return cfg.learning_rate
    return cfg.learning_rate * cfg.batch_size * cfg.gradient_accumulation_steps * num_processes


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: TrainConfig, lr: float
) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "adamw":
        # one multi-tensor kernel per group (foreach) or one fused kernel; the same update up to rounding
        kernel = {"foreach": {"foreach": True}, "fused": {"fused": True}}.get(cfg.adamw_impl, {})
        return torch.optim.AdamW(
            params,
            lr=lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
            **kernel,
        )
    # the official SDXL choice: fixed lr, update clipping at 1.0
    if cfg.optimizer == "adafactor":
        return Adafactor(
            params,
            lr=lr,
            weight_decay=cfg.adam_weight_decay,
            clip_threshold=1.0,
            scale_parameter=False,
            relative_step=False,
        )
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """Stepped once per optimizer step by the loop (never by accelerate), so warmup counts optimizer steps."""
    return get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
    )
