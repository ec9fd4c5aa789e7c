"""The training objectives, all functions of per-pair denoising errors e = mean_CHW (pred − target)².

Diffusion-DPO follows the official code (DiffusionDPO train.py): h = −½β[(e_w − e_l) − (e_ref_w − e_ref_l)],
loss = −log σ(h). `F.logsigmoid` keeps it finite for β = 1e9 and huge errors, where log(sigmoid(h)) would give −inf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "sft", "diffusion")


def dpo_logits(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """h per pair: positive when the policy improved the winner more (relative to the reference) than the loser."""
    return 0.5 * beta * reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l)


def reward_margin(
    model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor
) -> torch.Tensor:
    """−[(e_w − e_l) − (e_ref_w − e_ref_l)] per pair: h without the β/2 scale, so runs with different β compare."""
    return -((model_err_w - model_err_l) - (ref_err_w - ref_err_l))


def implicit_accuracy(h: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 where h > 0, 0.5 where h == 0 (the reference itself scores exactly 0.5), else 0."""
    return (h > 0).float() + 0.5 * (h == 0).float()


def diffusion_dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    reduction: str = "mean",
    label: torch.Tensor | None = None,
) -> torch.Tensor:
    """−log σ(h), or with a soft label p (0.5 for a kept tie): −[p·log σ(h) + (1 − p)·log σ(−h)].

    `label` defaults to 1 for every pair (the winner is preferred). `reduction` is "mean" or "none" (per pair).
    """
    h = dpo_logits(model_err_w.float(), model_err_l.float(), ref_err_w.float(), ref_err_l.float(), beta)
    if label is None:
        losses = -F.logsigmoid(h)
    else:
        p = label.to(h)
        losses = -(p * F.logsigmoid(h) + (1 - p) * F.logsigmoid(-h))
    return _reduce(losses, reduction)


def sft_loss(model_err_w: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Supervised fine-tuning on the preferred images only (DiffusionDPO's --sft)."""
    return _reduce(model_err_w.float(), reduction)


def diffusion_loss(
    model_err_w: torch.Tensor, model_err_l: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Plain denoising on both images of each pair; used to pretrain the tiny reference UNet."""
    return _reduce(0.5 * (model_err_w.float() + model_err_l.float()), reduction)


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "none":
        return losses
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
