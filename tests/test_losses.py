"""The objectives against hand computations, their gradients, and their stability at extreme β."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import (
    diffusion_dpo_loss,
    diffusion_loss,
    dpo_logits,
    implicit_accuracy,
    reward_margin,
    sft_loss,
)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_matches_hand_computation() -> None:
    e_w, e_l, r_w, r_l, beta = 0.30, 0.50, 0.40, 0.45, 10.0
    h = -0.5 * beta * ((e_w - e_l) - (r_w - r_l))  # = -5 * (-0.20 + 0.05) = 0.75
    assert h == pytest.approx(0.75)
    args = [torch.tensor([v], dtype=torch.float64) for v in (e_w, e_l, r_w, r_l)]
    assert dpo_logits(*args, beta).item() == pytest.approx(h)
    assert diffusion_dpo_loss(*args, beta).item() == pytest.approx(-math.log(_sigmoid(h)))
    assert reward_margin(*args).item() == pytest.approx(0.15)


def test_soft_label_form_and_default_label() -> None:
    g = torch.Generator().manual_seed(0)
    errs = [torch.rand(6, generator=g) for _ in range(4)]
    h = dpo_logits(*errs, 100.0)
    ones = diffusion_dpo_loss(*errs, 100.0, reduction="none", label=torch.ones(6))
    torch.testing.assert_close(ones, diffusion_dpo_loss(*errs, 100.0, reduction="none"))
    half = diffusion_dpo_loss(*errs, 100.0, reduction="none", label=torch.full((6,), 0.5))
    expected = -0.5 * (torch.log(torch.sigmoid(h)) + torch.log(torch.sigmoid(-h)))
    torch.testing.assert_close(half, expected)
    assert ones.shape == (6,)
    assert diffusion_dpo_loss(*errs, 100.0).item() == pytest.approx(ones.mean().item())


def test_dpo_gradient_matches_analytic() -> None:
    beta = 7.0
    e_w = torch.tensor([0.2, 0.9], dtype=torch.float64, requires_grad=True)
    e_l = torch.tensor([0.4, 0.1], dtype=torch.float64, requires_grad=True)
    r_w = torch.tensor([0.3, 0.5], dtype=torch.float64)
    r_l = torch.tensor([0.3, 0.2], dtype=torch.float64)
    diffusion_dpo_loss(e_w, e_l, r_w, r_l, beta, reduction="none").sum().backward()
    h = dpo_logits(e_w.detach(), e_l.detach(), r_w, r_l, beta)
    # dL/dh = -σ(-h); dh/de_w = -β/2; dh/de_l = +β/2
    torch.testing.assert_close(e_w.grad, 0.5 * beta * torch.sigmoid(-h))
    torch.testing.assert_close(e_l.grad, -0.5 * beta * torch.sigmoid(-h))


@pytest.mark.parametrize("beta", [5000.0, 1e9])
def test_stable_for_extreme_beta_and_errors(beta: float) -> None:
    e_w = torch.tensor([1e3, 0.0, 1e-3], requires_grad=True)
    e_l = torch.tensor([0.0, 1e3, 1e-3], requires_grad=True)
    zeros = torch.zeros(3)
    losses = diffusion_dpo_loss(e_w, e_l, zeros, zeros, beta, reduction="none")
    assert torch.isfinite(losses).all()
    h = dpo_logits(e_w.detach(), e_l.detach(), zeros, zeros, beta)
    assert losses[0].item() == pytest.approx(-h[0].item(), rel=1e-6)  # −log σ(h) → −h for h ≪ 0
    assert losses[1].item() == pytest.approx(0.0, abs=1e-6)
    losses.sum().backward()
    assert torch.isfinite(e_w.grad).all() and torch.isfinite(e_l.grad).all()
    soft = diffusion_dpo_loss(e_w.detach(), e_l.detach(), zeros, zeros, beta, label=torch.full((3,), 0.5))
    assert torch.isfinite(soft)


def test_implicit_accuracy_counts_ties_as_half() -> None:
    h = torch.tensor([1.0, -1.0, 0.0, 3.0])
    torch.testing.assert_close(implicit_accuracy(h), torch.tensor([1.0, 0.0, 0.5, 1.0]))
    same = torch.tensor([0.3, 0.7])
    assert implicit_accuracy(dpo_logits(same, same.flip(0), same, same.flip(0), 5000.0)).mean().item() == 0.5


def test_sft_and_diffusion_losses() -> None:
    e_w, e_l = torch.tensor([1.0, 3.0]), torch.tensor([5.0, 7.0])
    assert sft_loss(e_w).item() == 2.0
    assert diffusion_loss(e_w, e_l).item() == 4.0
    torch.testing.assert_close(diffusion_loss(e_w, e_l, reduction="none"), torch.tensor([3.0, 5.0]))
    with pytest.raises(ValueError, match="reduction"):
        sft_loss(e_w, reduction="sum")
