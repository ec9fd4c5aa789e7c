"""Each loss against a hand computation and against a literal transcription of its source repository's lines.

The oracles below are the sources' loss lines copied verbatim into small functions (only the surrounding plumbing —
`args`, the scheduler config, `accelerator.reduce` on one process — is supplied), so a disagreement means our
re-statement differs from the code that produced the published numbers. Each names the repository, commit, file and
the lines or block it comes from. Then: gradient signs, `reduction`, and finiteness at β = 1e9, errors 0 … 1e4.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from schemas.loss_table import ERRORS, LOSSES, default_beta
from trainer.losses import (
    LOSS_FUNCTIONS,
    cdpo_loss,
    diffusion_loss,
    dmpo_loss,
    dpo_logits,
    dpo_loss,
    dspo_loss,
    hinge_loss,
    implicit_accuracy,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    mapo_loss,
    mapo_margin,
    reward_margin,
    scale_loser_gradient,
    sdpo_loser_scale,
    sft_loss,
)

# the losses that are functions of the four per-pair errors alone
PAIR_LOSSES = {name: LOSS_FUNCTIONS[name] for name, spec in LOSSES.items() if spec.inputs == ERRORS}


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---------------------------------------------------------------------------------------------------------------------
# Oracles: the source lines, transcribed.


def oracle_diffusiondpo(model_pred, ref_pred, target, beta_dpo):
    """SalesforceAIResearch/DiffusionDPO@8d3ee5c train.py, `#### START LOSS COMPUTATION ####` block, dpo branch
    (L1125-1145 at 5233e75 per peers.md §2.1)."""
    args = SimpleNamespace(beta_dpo=beta_dpo)
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l  # These are both LBS (as is t)
    with torch.no_grad():  # Get the reference policy (unet) prediction
        ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * args.beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    loss = -1 * F.logsigmoid(inside_term).mean()
    return loss, implicit_acc


def oracle_diffusers(model_pred, ref_preds, target, loss_type, beta_dpo):
    """huggingface/diffusers@071190d examples/research_projects/diffusion_dpo/train_diffusion_dpo.py, from
    "# Compute losses." to the implicit_acc lines. The ipo branch reads `args.beta`, which that script never defines
    (peers.md §2.2); it is given here the value it evidently means, `beta_dpo`."""
    args = SimpleNamespace(loss_type=loss_type, beta_dpo=beta_dpo, beta=beta_dpo)
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l  # These are both LBS (as is t)
    with torch.no_grad():
        ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
        ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
        ref_losses_w, ref_losses_l = ref_loss.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    logits = ref_diff - model_diff
    if args.loss_type == "sigmoid":
        loss = -1 * F.logsigmoid(args.beta_dpo * logits).mean()
    elif args.loss_type == "hinge":
        loss = torch.relu(1 - args.beta_dpo * logits).mean()
    elif args.loss_type == "ipo":
        losses = (logits - 1 / (2 * args.beta)) ** 2
        loss = losses.mean()
    else:
        raise ValueError(f"Unknown loss type {args.loss_type}")
    implicit_acc = (logits > 0).sum().float() / logits.size(0)
    implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
    return loss, implicit_acc


def oracle_cdpo(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta,
                label_smoothing):  # fmt: skip
    """eric-mitchell/direct-preference-optimization@8a4023f trainers.py `preference_loss`, the non-IPO branch
    ("Eq. 3 https://ericmitchell.ai/cdpo.pdf"). For diffusion, log π(x) ↦ −e (the ELBO), and β_LLM = β/2."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    )
    return losses


def oracle_dmpo_dspo(model_pred, ref_pred, target, train_method, beta_dpo, dmpo_alpha=0.0, mu=None):
    """AIDC-AI/Diffusion-SDPO@1c83c65 train.py, `#### START LOSS COMPUTATION ####` block (L1187-1235 per peers.md
    §2.9): the safeguard (`use_winner_preserving` when mu is given), then the diffusion-dpo, dspo (SD1.5) and dmpo
    branches."""
    args = SimpleNamespace(
        beta_dpo=beta_dpo,
        dmpo_alpha=dmpo_alpha,
        train_method=train_method,
        sdxl=False,
        use_winner_preserving=mu is not None,
        winner_preserving_mu=mu,
    )
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    if args.use_winner_preserving:
        lose_l_scale = oracle_sdpo_scale(model_pred, target, args.winner_preserving_mu)
    else:
        lose_l_scale = 1.0
    model_losses_l_scaled = model_losses_l.detach() + lose_l_scale * (
        model_losses_l - model_losses_l.detach()
    )
    model_diff = model_losses_w - model_losses_l_scaled
    with torch.no_grad():  # Get the reference policy (unet) prediction
        ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * args.beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    if args.train_method == "diffusion-dpo":
        loss = -1 * F.logsigmoid(inside_term).mean()
    elif args.train_method == "dspo":
        pred2, _ = (model_pred - ref_pred).chunk(2)
        if args.sdxl:
            raise NotImplementedError  # the SDXL switch is not reproduced (see trainer/losses.py dspo_loss)
        else:
            model_diff_w, _ = (model_pred - target).chunk(2)
            loss = (
                (model_diff_w - args.beta_dpo * (1 - F.sigmoid(inside_term)[:, None, None, None]) * pred2)
                .pow(2)
                .mean(dim=[1, 2, 3])
                .mean()
            )
    elif args.train_method == "dmpo":
        ut = inside_term
        p = torch.sigmoid(ut)
        eps = 1e-6
        q = p.new(data=(1.0 - args.dmpo_alpha,)).reshape(-1)
        q = q.clamp(eps, 1 - eps)
        # log p = -softplus(-u), log(1-p) = -softplus(u)
        log_p = -F.softplus(-ut)
        log_1mp = -F.softplus(ut)
        # KL(p||q) = p*log(p/q) + (1-p)*log((1-p)/(1-q))
        loss = p * (log_p - torch.log(q)) + (1 - p) * (log_1mp - torch.log1p(-q))
        loss = loss.mean()
    else:
        raise NotImplementedError
    return loss, lose_l_scale


def oracle_dspo_repo(model_pred, ref_pred, target, beta_dpo):
    """huaishengzhu/DSPO@20867cf train.py, `#### START LOSS COMPUTATION ####` block, the dspo non-SDXL branch
    (L1137-1170 per peers.md §2.6)."""
    args = SimpleNamespace(beta_dpo=beta_dpo)
    model_diff_w, model_diff_l = (model_pred - target).chunk(2)
    model_losses_w = model_diff_w.pow(2).mean(dim=[1, 2, 3])
    model_losses_l = model_diff_l.pow(2).mean(dim=[1, 2, 3])
    model_diff = model_losses_w - model_losses_l  # These are both LBS (as is t)
    with torch.no_grad():
        ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * args.beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    pred2, _ = (model_pred - ref_pred).chunk(2)
    loss = (
        (model_diff_w - args.beta_dpo * (1 - F.sigmoid(inside_term)[:, None, None, None]) * pred2)
        .pow(2)
        .mean(dim=[1, 2, 3])
        .mean()
    )
    return loss


def oracle_sdpo_scale(pred_eps, true_eps, mu, eps=1e-9, max_lambda=1.0):
    """AIDC-AI/Diffusion-SDPO@1c83c65 train.py `get_adaptive_lose_l_scale` (L84-124 per peers.md §2.9), body."""
    assert 0.0 <= mu <= 1.0, "mu should be within [0,1]"
    pred_w, pred_l = pred_eps.detach().requires_grad_(True).chunk(2, dim=0)
    true_w, true_l = true_eps.detach().chunk(2, dim=0)
    A = ((pred_w - true_w) ** 2).mean()
    B = ((pred_l - true_l) ** 2).mean()
    gA = torch.autograd.grad(A, pred_w, create_graph=False, retain_graph=False)[0]
    gB = torch.autograd.grad(B, pred_l, create_graph=False, retain_graph=False)[0]
    num = gA.flatten().pow(2).sum()  # ||gA||^2
    den = (gB.flatten() * gA.flatten()).sum()  # gB·gA
    lam_cap = ((1.0 - float(mu)) * num) / (den + eps)
    lam = torch.where(
        den > 0, lam_cap, torch.tensor(max_lambda, device=pred_eps.device, dtype=pred_eps.dtype)
    )
    lam = lam.clamp(min=0.0, max=max_lambda).detach().to(dtype=pred_eps.dtype)
    return lam


def oracle_mapo(model_pred, target, snr_value, beta_mapo, num_train_timesteps):
    """mapo-t2i/mapo@4f2905f utils.py `compute_loss` (the last function of the file), body."""
    args = SimpleNamespace(snr_value=snr_value, beta_mapo=beta_mapo)
    noise_scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=num_train_timesteps))
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    log_odds = (args.snr_value * model_losses_w) / (torch.exp(args.snr_value * model_losses_w) - 1) - (
        args.snr_value * model_losses_l
    ) / (torch.exp(args.snr_value * model_losses_l) - 1)
    # Ratio loss.
    ratio = F.logsigmoid(log_odds * noise_scheduler.config.num_train_timesteps)
    ratio_losses = args.beta_mapo * ratio
    # Full ORPO loss
    loss = model_losses_w.mean() - ratio_losses.mean()
    return loss


def oracle_kto(model_losses, ref_loss, labels, beta_dpo, lambda_d=1.0, lambda_u=1.0):
    """jacklishufan/diffusion-kto@01c2fc3 train_kto_sd_v1.5.py, from `policy_KL_logps = - model_losses` to
    `loss = l_kto.mean()` with --halo sigmoid --loss kto (L1451-1509 at 226bbd0 per peers.md §2.4). One process:
    `accelerator.reduce(kl_gpu, reduction='mean')` is kl_gpu itself."""
    args = SimpleNamespace(beta_dpo=beta_dpo, halo="sigmoid", lambda_d_kto=lambda_d, lambda_u_kto=lambda_u)
    policy_KL_logps = -model_losses
    reference_KL_logps = -ref_loss
    g_term = policy_KL_logps - reference_KL_logps
    scale_term = args.beta_dpo
    kl_gpu = g_term.mean().detach()
    kl = kl_gpu
    kl = kl.clamp(min=0).detach()
    g_term = g_term - kl  # eq 8
    label_sgn = 2 * labels - 1
    labels_binary = labels == 1
    label_scale_g = label_sgn * scale_term * g_term
    if args.halo == "sigmoid":
        h = torch.sigmoid(label_scale_g)
    w_y = args.lambda_d_kto * labels_binary + args.lambda_u_kto * ~labels_binary
    l_kto = w_y * (1 - h)
    return l_kto.mean()


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def _pair_tensors(batch: int = 3, seed: int = 0, spread: float = 0.3):
    """Policy and reference predictions for B pairs ([winners; losers], 2B × 4 × 4 × 4) and the shared noise."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 4, 4, 4, generator=g, dtype=torch.float64)
    target = torch.cat([noise, noise])
    model_pred = (
        target + spread * torch.randn(target.shape, generator=g, dtype=torch.float64)
    ).requires_grad_()
    ref_pred = target + spread * torch.randn(target.shape, generator=g, dtype=torch.float64)
    return model_pred, ref_pred, target


def _errors(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (pred - target).pow(2).mean(dim=(1, 2, 3)).chunk(2)


def _ours_and_grad(loss_fn, model_pred, ref_pred, target, **kw):
    e_w, e_l = _errors(model_pred, target)
    r_w, r_l = _errors(ref_pred, target)
    loss = loss_fn(e_w, e_l, r_w, r_l, **kw)
    (grad,) = torch.autograd.grad(loss, model_pred)
    return loss, grad


def _oracle_grad(loss, model_pred):
    (grad,) = torch.autograd.grad(loss, model_pred)
    return loss, grad


def _assert_same(ours, oracle, rtol=1e-7, atol=1e-12):
    """Loss and gradient agree; atol is relative to the largest gradient entry."""
    torch.testing.assert_close(ours[0].double(), oracle[0].double(), rtol=rtol, atol=atol)
    scale = float(oracle[1].abs().max())
    torch.testing.assert_close(ours[1], oracle[1].to(ours[1].dtype), rtol=rtol, atol=atol * max(scale, 1.0))


FP32 = {"rtol": 1e-4, "atol": 1e-6}  # for sources that cast the predictions to fp32 before their loss


# ---------------------------------------------------------------------------------------------------------------------
# Hand computations: e_w, e_l, e_ref_w, e_ref_l = 0.30, 0.50, 0.40, 0.45 and β = 10, so m = 0.15 and h = 0.75.

E_W, E_L, R_W, R_L, BETA = 0.30, 0.50, 0.40, 0.45, 10.0
M = (R_W - R_L) - (E_W - E_L)
H = BETA * M / 2


def _hand_args():
    return [torch.tensor([v], dtype=torch.float64) for v in (E_W, E_L, R_W, R_L)]


def test_margin_and_logits_by_hand() -> None:
    assert math.isclose(M, 0.15) and math.isclose(H, 0.75)
    assert reward_margin(*_hand_args()).item() == pytest.approx(0.15)
    assert dpo_logits(*_hand_args(), BETA).item() == pytest.approx(0.75)


P = _sigmoid(H)
F_W = 0.5 * E_W / math.expm1(0.5 * E_W)
F_L = 0.5 * E_L / math.expm1(0.5 * E_L)
HAND = {
    "dpo": ({}, math.log1p(math.exp(-0.75))),
    "cdpo": ({"label_smoothing": 0.1}, 0.9 * math.log1p(math.exp(-0.75)) + 0.1 * math.log1p(math.exp(0.75))),
    "hinge": ({}, 0.25),
    "ipo": ({}, (0.15 - 0.1) ** 2),
    "dmpo": ({"alpha": 0.01}, P * math.log(P / 0.99) + (1 - P) * math.log((1 - P) / 0.01)),
    "mapo": ({"scale": 0.5, "temperature": 1000.0}, E_W - BETA * _log_sigmoid(1000.0 * (F_W - F_L))),
    "sft": ({}, E_W),
    "diffusion": ({}, (E_W + E_L) / 2),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_pair_loss_matches_hand_computation(name: str) -> None:
    params, expected = HAND[name]
    value = PAIR_LOSSES[name](*_hand_args(), beta=BETA, **params)
    assert value.item() == pytest.approx(expected, rel=1e-9)
    per_pair = PAIR_LOSSES[name](*_hand_args(), beta=BETA, reduction="none", **params)
    assert per_pair.shape == (1,)


def test_registry_covers_every_name() -> None:
    reference_free = {name for name, spec in LOSSES.items() if not spec.reference}
    winners_only = {name for name, spec in LOSSES.items() if spec.winners_only}
    assert set(PAIR_LOSSES) == set(HAND)
    assert set(LOSSES) == set(LOSS_FUNCTIONS) == set(HAND) | {"kto", "dspo"}
    assert reference_free.issubset(PAIR_LOSSES)
    assert winners_only <= reference_free  # the reference pass always runs over both sides
    assert default_beta("dmpo", "sdxl") == 6000.0 and default_beta("mapo", "sd15") == 0.1


def test_kto_by_hand() -> None:
    # two images: a desirable one the policy improved (g = +0.02), an undesirable one it also improved (g = +0.01)
    model_err, ref_err = torch.tensor([0.30, 0.50]), torch.tensor([0.32, 0.51])
    desirable = torch.tensor([True, False])
    z0 = kto_reference_point(model_err, ref_err)
    assert z0.item() == pytest.approx(0.015)
    loss = kto_loss(model_err, ref_err, desirable, beta=100.0, reference_point=z0, reduction="none")
    expected = [1 - _sigmoid(100 * (0.02 - 0.015)), 1 - _sigmoid(-100 * (0.01 - 0.015))]
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # the reference point is never negative: a policy worse than the reference everywhere has z0 = 0
    assert kto_reference_point(ref_err, model_err).item() == 0.0


def test_dspo_by_hand() -> None:
    # one pair, one latent value: ε = 0, ε_θ^w = 0.2, ε_ref^w = 0.1; errors e_w = 0.04, e_ref_w = 0.01, e_l = e_ref_l
    pred_w, ref_w, target = (torch.tensor([[[[v]]]], dtype=torch.float64) for v in (0.2, 0.1, 0.0))
    e_w, r_w, e_l = torch.tensor([0.04]), torch.tensor([0.01]), torch.tensor([0.5])
    beta = 2.0
    h = beta * ((0.01 - 0.5) - (0.04 - 0.5)) / 2  # = −0.03
    expected = (0.2 - beta * (1 - _sigmoid(h)) * 0.1) ** 2
    value = dspo_loss(pred_w, ref_w, target, e_w, e_l, r_w, e_l, beta=beta)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_sdpo_scale_by_hand() -> None:
    r_w, r_l = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])  # ‖r_w‖² = 1, r_l·r_w = 1
    assert sdpo_loser_scale(r_w, r_l, mu=0.9).item() == pytest.approx(0.1)
    assert sdpo_loser_scale(r_w, 4 * r_l, mu=0.0).item() == pytest.approx(0.25)
    assert sdpo_loser_scale(r_w, -r_l, mu=0.9).item() == 1.0  # opposed gradients: the loser is left alone
    assert sdpo_loser_scale(r_w, 0.5 * r_l, mu=0.0).item() == 1.0  # capped at 1
    e_l = torch.tensor([2.0], requires_grad=True)
    scaled = scale_loser_gradient(e_l, 0.25)
    scaled.backward()
    assert scaled.item() == 2.0 and e_l.grad.item() == 0.25


# ---------------------------------------------------------------------------------------------------------------------
# Against the source lines: value and gradient with respect to the policy's predictions.


@pytest.mark.parametrize("beta", [10.0, 5000.0])
def test_dpo_matches_diffusiondpo_source(beta: float) -> None:
    model_pred, ref_pred, target = _pair_tensors()
    oracle_loss, oracle_acc = oracle_diffusiondpo(model_pred, ref_pred, target, beta)
    oracle = _oracle_grad(oracle_loss, model_pred)
    _assert_same(_ours_and_grad(dpo_loss, model_pred, ref_pred, target, beta=beta), oracle)
    h = dpo_logits(*_errors(model_pred.detach(), target), *_errors(ref_pred, target), beta)
    assert implicit_accuracy(h).mean().item() == pytest.approx(oracle_acc.item())


@pytest.mark.parametrize(
    ("ours", "loss_type"), [(dpo_loss, "sigmoid"), (hinge_loss, "hinge"), (ipo_loss, "ipo")]
)
@pytest.mark.parametrize("beta", [10.0, 5000.0])
def test_sigmoid_hinge_ipo_match_diffusers_source(ours, loss_type: str, beta: float) -> None:
    """diffusers' β is half the official one (no ½ inside), so ours at β is diffusers' at β/2."""
    model_pred, ref_pred, target = _pair_tensors(spread=0.05)
    oracle_loss, oracle_acc = oracle_diffusers(model_pred, ref_pred, target, loss_type, beta / 2)
    oracle = _oracle_grad(oracle_loss, model_pred)
    ours_result = _ours_and_grad(ours, model_pred, ref_pred, target, beta=beta)
    _assert_same(ours_result, oracle, **FP32)
    h = dpo_logits(*_errors(model_pred.detach(), target), *_errors(ref_pred, target), beta)
    assert implicit_accuracy(h).mean().item() == pytest.approx(oracle_acc.item())


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_cdpo_matches_dpo_repo_source(label_smoothing: float) -> None:
    model_pred, ref_pred, target = _pair_tensors()
    e_w, e_l = _errors(model_pred, target)
    r_w, r_l = _errors(ref_pred, target)
    oracle = _oracle_grad(oracle_cdpo(-e_w, -e_l, -r_w, -r_l, 2500.0, label_smoothing).mean(), model_pred)
    ours = _ours_and_grad(
        cdpo_loss, model_pred, ref_pred, target, beta=5000.0, label_smoothing=label_smoothing
    )
    _assert_same(ours, oracle)


@pytest.mark.parametrize("beta", [2000.0, 6000.0])
def test_dmpo_matches_sdpo_repo_source(beta: float) -> None:
    model_pred, ref_pred, target = _pair_tensors(spread=0.05)
    oracle_loss, _ = oracle_dmpo_dspo(model_pred, ref_pred, target, "dmpo", beta, dmpo_alpha=0.01)
    oracle = _oracle_grad(oracle_loss, model_pred)
    _assert_same(_ours_and_grad(dmpo_loss, model_pred, ref_pred, target, beta=beta, alpha=0.01), oracle)


def test_mapo_matches_mapo_source() -> None:
    model_pred, ref_pred, target = _pair_tensors()
    oracle = _oracle_grad(oracle_mapo(model_pred, target, 0.5, 0.1, 1000), model_pred)
    ours = _ours_and_grad(mapo_loss, model_pred, ref_pred, target, beta=0.1, scale=0.5, temperature=1000.0)
    _assert_same(ours, oracle, **FP32)
    e_w, e_l = _errors(model_pred.detach(), target)
    assert mapo_loss(e_w, e_l, None, None, beta=0.1).item() == pytest.approx(
        ours[0].item()
    )  # reference ignored


def test_kto_matches_diffusion_kto_source() -> None:
    g = torch.Generator().manual_seed(3)
    ref_err = torch.rand(8, generator=g, dtype=torch.float64)
    model_err = (ref_err + 0.01 * torch.randn(8, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float64)  # winners then losers
    for lambda_d, lambda_u in ((1.0, 1.0), (1.0, 2.0)):
        oracle_loss = oracle_kto(model_err, ref_err, labels, 1000.0, lambda_d, lambda_u)
        (oracle_grad,) = torch.autograd.grad(oracle_loss, model_err)
        z0 = kto_reference_point(model_err, ref_err)
        loss = kto_loss(
            model_err,
            ref_err,
            labels == 1,
            beta=1000.0,
            reference_point=z0,
            lambda_desirable=lambda_d,
            lambda_undesirable=lambda_u,
        )
        (grad,) = torch.autograd.grad(loss, model_err)
        torch.testing.assert_close(loss.double(), oracle_loss)
        torch.testing.assert_close(grad, oracle_grad)


@pytest.mark.parametrize("beta", [0.001, 0.05, 1.0])
def test_dspo_matches_both_source_repos(beta: float) -> None:
    model_pred, ref_pred, target = _pair_tensors()
    e_w, e_l = _errors(model_pred, target)
    r_w, r_l = _errors(ref_pred, target)
    pred_w, ref_w, target_w = model_pred.chunk(2)[0], ref_pred.chunk(2)[0], target.chunk(2)[0]
    ours = _oracle_grad(dspo_loss(pred_w, ref_w, target_w, e_w, e_l, r_w, r_l, beta=beta), model_pred)
    _assert_same(ours, _oracle_grad(oracle_dspo_repo(model_pred, ref_pred, target, beta), model_pred))
    sdpo_repo, _ = oracle_dmpo_dspo(model_pred, ref_pred, target, "dspo", beta)
    _assert_same(ours, _oracle_grad(sdpo_repo, model_pred))


@pytest.mark.parametrize(("method", "mu"), [("diffusion-dpo", 0.9), ("diffusion-dpo", 0.0), ("dmpo", 0.6)])
def test_sdpo_safeguard_matches_sdpo_source(method: str, mu: float) -> None:
    """λ in closed form equals the source's autograd λ; the wrapped loss and its gradient equal the source's."""
    lambdas = []
    for seed in range(4):
        model_pred, ref_pred, target = _pair_tensors(seed=seed, spread=0.05)
        if seed % 2:  # a loser residual aligned with the winner's, so that the cap binds
            pred_w, noise = model_pred.detach().chunk(2)[0], target.chunk(2)[0]
            model_pred = torch.cat([pred_w, noise + (1 + seed / 4) * (pred_w - noise)]).requires_grad_()
        oracle_loss, oracle_lam = oracle_dmpo_dspo(model_pred, ref_pred, target, method, 2000.0, 0.01, mu=mu)
        oracle = _oracle_grad(oracle_loss, model_pred)
        residual_w, residual_l = (model_pred - target).chunk(2)
        lam = sdpo_loser_scale(residual_w, residual_l, mu)
        torch.testing.assert_close(lam.double(), oracle_lam, rtol=1e-6, atol=1e-9)
        fn, params = (dpo_loss, {}) if method == "diffusion-dpo" else (dmpo_loss, {"alpha": 0.01})
        e_w, e_l = _errors(model_pred, target)
        r_w, r_l = _errors(ref_pred, target)
        loss = fn(e_w, scale_loser_gradient(e_l, lam), r_w, r_l, beta=2000.0, **params)
        _assert_same(_oracle_grad(loss, model_pred), oracle, rtol=1e-6, atol=1e-9)
        lambdas.append(lam.item())
    assert min(lambdas) < 0.9 and max(lambdas) == 1.0  # both regimes were exercised


def test_sdpo_keeps_the_winner_error_from_rising() -> None:
    """The guarantee itself, on a model whose two outputs share their parameters (pred = offset + θ): one small step
    of plain DPO raises the winner's error when the loser's residual is aligned with it; the safeguarded step
    does not."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    residual = 0.1 * torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    offsets = torch.cat(
        [noise + residual, noise + 2 * residual]
    )  # the loser's residual is twice the winner's
    target = torch.cat([noise, noise])
    theta = torch.zeros(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    e_w, e_l = _errors(offsets + theta, target)
    lam = sdpo_loser_scale(*(offsets - target).chunk(2), mu=0.5)
    assert lam.item() == pytest.approx(0.25)  # (1 − μ)·‖r‖² / (2r·r)
    for scale, should_rise in ((1.0, True), (lam, False)):
        loss = dpo_loss(e_w, scale_loser_gradient(e_l, scale), e_w.detach(), e_l.detach(), beta=5000.0)
        (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
        stepped = theta.detach() - 1e-4 * grad / grad.norm()
        rise = _errors(offsets + stepped, target)[0] - e_w.detach()
        assert (rise.item() > 0) == should_rise


# ---------------------------------------------------------------------------------------------------------------------
# Gradient signs: a higher winner error always costs, a higher loser error always pays (where the loss is active).


@pytest.mark.parametrize("name", ["dpo", "cdpo", "hinge", "ipo", "dmpo", "mapo"])
def test_gradient_signs(name: str) -> None:
    e_w = torch.tensor([0.30], dtype=torch.float64, requires_grad=True)
    e_l = torch.tensor([0.50], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.40], dtype=torch.float64)
    params = HAND[name][0]
    # β = 1 keeps every loss in its active region (hinge h < 1, ipo m < 1/β, dmpo p < 1 − α)
    beta = 0.1 if name == "mapo" else 1.0
    PAIR_LOSSES[name](e_w, e_l, r, r, beta=beta, **params).backward()
    assert e_w.grad.item() > 0 and e_l.grad.item() < 0


def test_kto_gradient_signs() -> None:
    model_err = torch.tensor([0.3, 0.3], requires_grad=True)
    ref_err = torch.tensor([0.3, 0.3])
    kto_loss(model_err, ref_err, torch.tensor([True, False]), beta=10.0, reference_point=0.0).backward()
    assert (
        model_err.grad[0] > 0 and model_err.grad[1] < 0
    )  # desirable: lower its error; undesirable: raise it


def test_dspo_pulls_the_winner_towards_the_noise() -> None:
    model_pred, ref_pred, target = _pair_tensors()
    e_w, e_l = _errors(model_pred, target)
    r_w, r_l = _errors(ref_pred, target)
    pred_w = model_pred.chunk(2)[0]
    loss = dspo_loss(pred_w, ref_pred.chunk(2)[0], target.chunk(2)[0], e_w, e_l, r_w, r_l, beta=0.001)
    (grad,) = torch.autograd.grad(loss, model_pred)
    residual = (pred_w - target.chunk(2)[0]).detach()
    assert (grad.chunk(2)[0] * residual).sum() > 0  # descending it shrinks the winner's residual


# ---------------------------------------------------------------------------------------------------------------------
# Extreme inputs: β up to 1e9, errors 0 … 1e4, in fp32 as the trainer computes them.

EXTREME_ERRORS = [0.0, 1e-8, 1e-3, 1.0, 1e4]


def _extreme_grid():
    values = torch.tensor(EXTREME_ERRORS)
    grid = torch.cartesian_prod(values, values, values, values)
    return [grid[:, i].clone().requires_grad_(i < 2) for i in range(4)]


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
@pytest.mark.parametrize("beta", [0.001, 5000.0, 1e9])
def test_pair_losses_are_finite_at_extremes(name: str, beta: float) -> None:
    e_w, e_l, r_w, r_l = _extreme_grid()
    params = HAND[name][0]
    losses = PAIR_LOSSES[name](e_w, e_l, r_w, r_l, beta=beta, reduction="none", **params)
    assert losses.shape == e_w.shape and torch.isfinite(losses).all()
    losses.sum().backward()
    assert all(torch.isfinite(e.grad).all() for e in (e_w, e_l) if e.grad is not None)


def test_dpo_at_extremes_has_the_right_limits() -> None:
    zeros = torch.zeros(2)
    losses = dpo_loss(
        torch.tensor([1e3, 0.0]), torch.tensor([0.0, 1e3]), zeros, zeros, beta=1e9, reduction="none"
    )
    assert losses[0].item() == pytest.approx(0.5e12, rel=1e-6)  # −log σ(h) → −h for h ≪ 0
    assert losses[1].item() == 0.0
    soft = dpo_loss(torch.tensor([1e3]), zeros[:1], zeros[:1], zeros[:1], beta=1e9, label=torch.tensor([0.5]))
    assert torch.isfinite(soft)


def test_mapo_margin_is_smooth_and_finite() -> None:
    e = torch.tensor([0.0, 1e-9, 1e-5, 2e-4, 0.5, 10.0, 1e4], dtype=torch.float64, requires_grad=True)
    f = mapo_margin(e, 0.5)
    x = 0.5 * e.detach()
    exact = torch.where(x == 0, torch.ones_like(x), x / torch.expm1(x))
    torch.testing.assert_close(f.detach(), exact, rtol=1e-9, atol=0)
    f.sum().backward()
    assert torch.isfinite(e.grad).all() and (e.grad <= 0).all()  # decreasing in the error
    assert e.grad[0].item() == pytest.approx(-0.25)  # f'(0) = −s/2
    neg = mapo_margin(torch.tensor([-1e-6, -3.0, -1e4]), 0.5)  # the function is defined for any input
    assert torch.isfinite(neg).all() and neg[2].item() == pytest.approx(5e3)


def test_kto_and_dspo_are_finite_at_extremes() -> None:
    model_err = torch.tensor(EXTREME_ERRORS * 2, requires_grad=True)
    ref_err = torch.tensor(EXTREME_ERRORS[::-1] * 2)
    desirable = torch.tensor([True] * 5 + [False] * 5)
    for beta in (1000.0, 1e9):
        loss = kto_loss(
            model_err, ref_err, desirable, beta=beta, reference_point=kto_reference_point(model_err, ref_err)
        )
        (grad,) = torch.autograd.grad(loss, model_err)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    pred = torch.full((2, 4, 2, 2), 100.0, requires_grad=True)
    zeros = torch.zeros(2, 4, 2, 2)
    big, none = torch.tensor([1e4, 0.0]), torch.tensor([0.0, 1e4])
    loss = dspo_loss(pred, zeros, zeros, big, none, none, big, beta=1e3)
    (grad,) = torch.autograd.grad(loss, pred)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (
        sdpo_loser_scale(torch.zeros(4), torch.zeros(4), 0.9).item() == 1.0
    )  # 0/0 never reaches the division


# ---------------------------------------------------------------------------------------------------------------------
# Small contracts


def test_implicit_accuracy_counts_ties_as_half() -> None:
    h = torch.tensor([1.0, -1.0, 0.0, 3.0])
    torch.testing.assert_close(implicit_accuracy(h), torch.tensor([1.0, 0.0, 0.5, 1.0]))


def test_soft_label_and_reduction_contracts() -> None:
    g = torch.Generator().manual_seed(0)
    errs = [torch.rand(6, generator=g) for _ in range(4)]
    ones = dpo_loss(*errs, beta=100.0, reduction="none", label=torch.ones(6))
    torch.testing.assert_close(ones, dpo_loss(*errs, beta=100.0, reduction="none"))
    soft = dpo_loss(*errs, beta=100.0, reduction="none", label=torch.full((6,), 0.9))
    torch.testing.assert_close(soft, cdpo_loss(*errs, beta=100.0, reduction="none", label_smoothing=0.1))
    assert dpo_loss(*errs, beta=100.0).item() == pytest.approx(ones.mean().item())
    with pytest.raises(ValueError, match="reduction"):
        sft_loss(errs[0], reduction="sum")
    with pytest.raises(ValueError, match="label_smoothing"):
        cdpo_loss(*errs, beta=1.0, label_smoothing=0.5)
    with pytest.raises(ValueError, match="alpha"):
        dmpo_loss(*errs, beta=1.0, alpha=0.0)
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(*errs, beta=0.0)
    assert diffusion_loss(torch.tensor([1.0]), torch.tensor([3.0])).item() == 2.0
