"""The preference losses, as plain functions of per-pair denoising errors e = mean_CHW (pred − target)².

Every published offline Diffusion-DPO follow-up is a different function of the same four errors of a pair (policy /
reference × winner / loser) or a small change to the step, so they share one code path here. With
    m = (e_ref_w − e_ref_l) − (e_w − e_l)      (the reward margin: > 0 when the policy favours the winner more)
    h = β·m/2                                   (DiffusionDPO's `inside_term` with `scale_term = −0.5·β`)
each loss whose loss-table entry reads the four errors (`inputs` ERRORS) is
`fn(model_err_w, model_err_l, ref_err_w, ref_err_l, *, beta, reduction, **params)`. `kto_loss`, `dspo_loss` and the
SDPO safeguard need more than the four errors (per-image labels and a batch reference point; prediction tensors;
the residuals) and have their own signatures. What else the trainer knows of a loss (its passes, defaults, flags) is
its entry in schemas/loss_table.py; `LOSS_FUNCTIONS` binds each entry to its function here.

All are finite for β up to 1e9 and errors from 0 to 1e4: log σ is `F.logsigmoid`, never `log(sigmoid())`, and
MaPO's f(x) = x/(eˣ − 1) is evaluated in the form that neither overflows nor divides 0 by 0.
Each is tested against the source repository's own lines in tests/test_losses.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from schemas.loss_table import LOSSES

Reduction = Literal["mean", "none"]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 → fp32 (the loss is always computed in at least fp32); fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def reward_margin(
    model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor
) -> torch.Tensor:
    """m = −[(e_w − e_l) − (e_ref_w − e_ref_l)] per pair: h without the β/2 scale, so runs with different β compare."""
    return -((_wide(model_err_w) - _wide(model_err_l)) - (_wide(ref_err_w) - _wide(ref_err_l)))


def dpo_logits(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """h = β·m/2 per pair: positive when the policy improved the winner more (relative to the reference) than the
    loser. The ½ keeps β on the official scale (diffusers' β = 2500 is the official 5000)."""
    return 0.5 * beta * reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l)


def implicit_accuracy(h: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 where h > 0, 0.5 where h == 0 (the reference itself scores exactly 0.5), else 0."""
    return (h > 0).float() + 0.5 * (h == 0).float()


def reduce(losses: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "none":
        return losses
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _soft_label_nll(h: torch.Tensor, p: torch.Tensor | float) -> torch.Tensor:
    """−[p·log σ(h) + (1 − p)·log σ(−h)]: a Bernoulli likelihood for "the winner is preferred" with probability p."""
    if isinstance(p, float) and p == 1.0:
        return -F.logsigmoid(h)
    return -(p * F.logsigmoid(h) + (1 - p) * F.logsigmoid(-h))


def dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    reduction: Reduction = "mean",
    label: torch.Tensor | None = None,
) -> torch.Tensor:
    """Diffusion-DPO: −log σ(h); with a soft label p per pair (0.5 for a kept tie) −[p·log σ(h) + (1−p)·log σ(−h)]."""
    h = dpo_logits(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    return reduce(_soft_label_nll(h, 1.0 if label is None else label.to(h)), reduction)


def cdpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """Conservative DPO: every label is trusted with probability 1 − ε, so a flipped pair cannot drive h to −∞."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h = dpo_logits(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    return reduce(_soft_label_nll(h, 1.0 - label_smoothing), reduction)


def hinge_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """relu(1 − h): no gradient once a pair's margin is past 2/β (the RSO / SLiC hinge)."""
    h = dpo_logits(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    return reduce(F.relu(1 - h), reduction)


def ipo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """(m − 1/β)²: regresses the margin to a finite target instead of pushing it to infinity. On the official β
    scale; diffusers writes 1/(2β) with its β = official/2, the same target."""
    if beta <= 0:
        raise ValueError(f"ipo needs beta > 0, got {beta}")
    m = reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l)
    return reduce((m - 1.0 / beta) ** 2, reduction)


def dmpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    reduction: Reduction = "mean",
    alpha: float = 0.01,
) -> torch.Tensor:
    """DMPO: KL(Bern(p) ‖ Bern(1 − α)) with p = σ(h) = p·log(p/(1−α)) + (1−p)·log((1−p)/α); its minimum is at
    p = 1 − α, so the margin stops growing once the pair is won with probability 1 − α."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"dmpo alpha must be in (0, 1), got {alpha}")
    h = dpo_logits(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    p = torch.sigmoid(h)
    losses = p * (F.logsigmoid(h) - math.log1p(-alpha)) + (1 - p) * (F.logsigmoid(-h) - math.log(alpha))
    return reduce(losses, reduction)


def mapo_margin(err: torch.Tensor, scale: float) -> torch.Tensor:
    """f(e) = s·e / (exp(s·e) − 1) with f(0) = 1: MaPO's likelihood proxy, decreasing in the error.

    Written as x·e^(−x) / (1 − e^(−x)) for x > 0 (no overflow at x = 5000, no inf/inf in the gradient), x / expm1(x)
    for x < 0, and its Taylor series near 0 (no 0/0). Every branch sees only inputs valid for it, so the branches
    not taken contribute exact zeros to the gradient, never NaN.
    """
    x = scale * _wide(err)
    tiny = 1e-4
    pos = x.clamp(min=tiny)
    neg = x.clamp(max=-tiny)
    f_pos = pos * torch.exp(-pos) / -torch.expm1(-pos)
    f_neg = neg / torch.expm1(neg)
    taylor = 1 - x / 2 + x * x / 12
    return torch.where(x.abs() < tiny, taylor, torch.where(x > 0, f_pos, f_neg))


def mapo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor | None = None,
    ref_err_l: torch.Tensor | None = None,
    *,
    beta: float,
    reduction: Reduction = "mean",
    scale: float = 0.5,
    temperature: float = 1000.0,
) -> torch.Tensor:
    """MaPO (reference-free): e_w − β·log σ(T·(f(e_w) − f(e_l))). The reference errors are accepted and ignored;
    T is the scheduler's num_train_timesteps in the source."""
    margin = mapo_margin(model_err_w, scale) - mapo_margin(model_err_l, scale)
    losses = _wide(model_err_w) - beta * F.logsigmoid(temperature * margin)
    return reduce(losses, reduction)


def sft_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor | None = None,
    ref_err_w: torch.Tensor | None = None,
    ref_err_l: torch.Tensor | None = None,
    *,
    beta: float | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Supervised fine-tuning on the preferred images only (DiffusionDPO's --sft): the reference-free baseline."""
    return reduce(_wide(model_err_w), reduction)


def diffusion_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor | None = None,
    ref_err_l: torch.Tensor | None = None,
    *,
    beta: float | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Plain denoising on both images of each pair."""
    return reduce(0.5 * (_wide(model_err_w) + _wide(model_err_l)), reduction)


def kto_reference_point(
    model_err: torch.Tensor,
    ref_err: torch.Tensor,
    mean_over_processes: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> torch.Tensor:
    """z0 = max(0, mean(e_ref − e_θ)), detached: KTO's estimate of KL(π_θ ‖ π_ref), the point against which each
    image's implicit reward counts as a gain or a loss. The mean is taken over all processes before the clamp, as
    Diffusion-KTO's `accelerator.reduce(kl_gpu, reduction='mean')` does."""
    return mean_over_processes((_wide(ref_err) - _wide(model_err)).mean().detach()).clamp(min=0)


def kto_loss(
    model_err: torch.Tensor,
    ref_err: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float,
    reference_point: torch.Tensor | float,
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Diffusion-KTO, per image: λ_y·(1 − σ(y·β·(g − z0))), g = e_ref − e_θ, y = +1 desirable / −1 undesirable.

    Unpaired: each image carries its own label, so a batch of pairs gives 2B images (winners desirable, losers
    undesirable); `reference_point` is z0 from `kto_reference_point`.
    """
    g = _wide(ref_err) - _wide(model_err)
    wanted = desirable.to(torch.bool)
    sign = wanted.to(g.dtype) * 2 - 1
    weight = torch.where(wanted, lambda_desirable, lambda_undesirable)
    losses = weight * (1 - torch.sigmoid(sign * beta * (g - reference_point)))
    return reduce(losses, reduction)


def dspo_loss(
    model_pred_w: torch.Tensor,
    ref_pred_w: torch.Tensor,
    target_w: torch.Tensor,
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """DSPO (SD1.5 form): mean_CHW ‖(ε_θ^w − ε) − β·(1 − σ(h))·(ε_θ^w − ε_ref^w)‖², a score-matching regression on
    the winner whose pull towards the reference is weighted by how badly the pair is currently lost.

    As in the source, the weight 1 − σ(h) is not detached. The source's SDXL branch (a switch between two other
    formulas) is not reproduced: this form is used for every model family.
    """
    h = dpo_logits(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    weight = torch.sigmoid(-h)[:, None, None, None]
    pred_w = _wide(model_pred_w)
    residual = (pred_w - _wide(target_w)) - beta * weight * (pred_w - _wide(ref_pred_w))
    return reduce(residual.pow(2).mean(dim=(1, 2, 3)), reduction)


def sdpo_loser_scale(residual_w: torch.Tensor, residual_l: torch.Tensor, mu: float) -> torch.Tensor:
    """Diffusion-SDPO's λ for one batch: the largest loser-gradient scale that keeps the winner's error from rising.

    g_w = ∂ mean‖ε_θ^w − ε‖² / ∂ε_θ^w = 2·(ε_θ^w − ε)/n, g_l likewise (n = elements of one half): the output-space
    gradients, in closed form since the noise is shared. λ = clip((1 − μ)·‖g_w‖² / (g_l·g_w + 1e-9), 0, 1) if
    g_l·g_w > 0, else 1 — the source's formula, its 1e-9 guard included.
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"sdpo mu must be in [0, 1], got {mu}")
    n = residual_w.numel()
    g_w = 2 * _wide(residual_w.detach()).flatten() / n
    g_l = 2 * _wide(residual_l.detach()).flatten() / n
    den = (g_l * g_w).sum()
    cap = (1.0 - mu) * g_w.pow(2).sum() / (den.clamp(min=0) + 1e-9)
    return torch.where(den > 0, cap, torch.ones_like(cap)).clamp(0.0, 1.0)


def scale_loser_gradient(model_err_l: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """e_l' = sg(e_l) + λ·(e_l − sg(e_l)): the same value, its gradient multiplied by λ."""
    detached = model_err_l.detach()
    return detached + scale * (model_err_l - detached)


# each loss table entry's function, by the name the entry gives (schemas/loss_table.py): a missing one fails here
LOSS_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    name: globals()[spec.function] for name, spec in LOSSES.items()
}
