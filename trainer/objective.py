"""The training objective: which passes a `--loss` needs, and the loss and its metrics from their outputs.

Every loss runs on the same step: one policy pass over [winners; losers] with the pair's shared noise and timestep,
one reference pass unless the loss is reference-free (mapo, sft, diffusion: no reference UNet is loaded at all), and
for KTO with a mismatched reference point one more no-grad pass of each over images paired with another pair's
caption. Which of these a loss needs, its defaults and how its function is called are its entry in the loss table
(schemas/loss_table.py); the formulas themselves are the plain functions of trainer/losses.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel

from schemas.config import TrainConfig
from schemas.loss_table import LOSSES, NUM_TRAIN_TIMESTEPS, PER_IMAGE, PREDICTIONS, LossSpec, default_beta
from trainer.losses import (
    LOSS_FUNCTIONS,
    dpo_logits,
    implicit_accuracy,
    kto_reference_point,
    reward_margin,
    scale_loser_gradient,
    sdpo_loser_scale,
)
from trainer.model import Models, PairOutput, pair_forward, reference_forward

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """A `--loss` with its resolved hyper-parameters (published defaults unless a flag overrides them)."""

    loss: str
    beta: float
    params: dict[str, float] = field(default_factory=dict)
    sdpo_mu: float = 0.0
    kto_reference_point: str = "mismatched"

    @classmethod
    def from_config(cls, cfg: TrainConfig, family: str, num_train_timesteps: int) -> Objective:
        """Each parameter from its flag, else its published default (MaPO's T: the scheduler's timesteps)."""
        params = {}
        for param in LOSSES[cfg.loss].params:
            value = getattr(cfg, param.flag)
            if value is None:
                value = float(num_train_timesteps) if param.default == NUM_TRAIN_TIMESTEPS else param.default
            params[param.keyword] = value
        beta = cfg.beta if cfg.beta is not None else default_beta(cfg.loss, family)
        return cls(cfg.loss, beta, params, cfg.sdpo_mu, cfg.kto_reference_point)

    @property
    def spec(self) -> LossSpec:
        return LOSSES[self.loss]

    @property
    def needs_reference(self) -> bool:
        return self.spec.reference

    @property
    def needs_losers(self) -> bool:
        """A winners-only loss (SFT) skips the losers in its policy pass: half the step's compute."""
        return not self.spec.winners_only

    @property
    def needs_mismatched_pass(self) -> bool:
        return self.spec.mismatched_pass and self.kto_reference_point == "mismatched"

    def __call__(
        self,
        policy: PairOutput,
        reference: PairOutput | None,
        label: torch.Tensor,
        *,
        mismatched: tuple[torch.Tensor, torch.Tensor] | None = None,
        mean_over_processes: Reduce = lambda x: x,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one micro-batch and its metrics (detached batch means). `mismatched` = (policy, reference)
        errors of the mismatched pass for KTO; `mean_over_processes` averages KTO's reference point across ranks."""
        function = LOSS_FUNCTIONS[self.loss]
        err_w, err_l = policy.errors
        stats = {"policy_err_w": err_w.detach().mean()}
        if err_l is not None:
            stats["policy_err_l"] = err_l.detach().mean()
        if reference is None:
            return function(err_w, err_l, None, None, beta=self.beta, **self.params), stats
        ref_w, ref_l = reference.errors
        stats.update(
            ref_err_w=ref_w.mean(),
            ref_err_l=ref_l.mean(),
            implicit_accuracy=implicit_accuracy(dpo_logits(err_w, err_l, ref_w, ref_l, 1.0)).mean(),
            reward_margin=reward_margin(err_w, err_l, ref_w, ref_l).detach().mean(),
        )
        if self.sdpo_mu:
            scale = sdpo_loser_scale(*(policy.pred - policy.target).chunk(2), self.sdpo_mu)
            err_l = scale_loser_gradient(err_l, scale)
            stats["sdpo_loser_scale"] = scale
        if self.spec.inputs == PER_IMAGE:
            return self._per_image(policy, reference, mismatched, mean_over_processes, stats)
        if self.spec.inputs == PREDICTIONS:
            pred_w, target_w = policy.pred.chunk(2)[0], policy.target.chunk(2)[0]
            ref_pred_w = reference.pred.chunk(2)[0]
            loss = function(
                pred_w, ref_pred_w, target_w, err_w, err_l, ref_w, ref_l, beta=self.beta, **self.params
            )
            return loss, stats
        extra = {"label": label} if self.spec.soft_labels else {}
        loss = function(err_w, err_l, ref_w, ref_l, beta=self.beta, **self.params, **extra)
        return loss, stats

    def _per_image(
        self,
        policy: PairOutput,
        reference: PairOutput,
        mismatched: tuple[torch.Tensor, torch.Tensor] | None,
        mean_over_processes: Reduce,
        stats: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """KTO's form: per image, the winners desirable, the losers undesirable (as Diffusion-KTO's `gt_label`
        policies do), against a reference point from the mismatched pass or the batch itself."""
        model_err = torch.cat(policy.errors)
        ref_err = torch.cat(reference.errors)
        desirable = torch.arange(len(model_err), device=model_err.device) < len(policy.err_w)
        kl_model, kl_ref = mismatched if mismatched is not None else (model_err, ref_err)
        z0 = kto_reference_point(kl_model, kl_ref, mean_over_processes)
        stats["kto_reference_point"] = z0
        loss = LOSS_FUNCTIONS[self.loss](
            model_err, ref_err, desirable, beta=self.beta, reference_point=z0, **self.params
        )
        return loss, stats


def mismatch_captions(batch: dict) -> dict:
    """The batch with each pair's caption replaced by the next pair's (a cyclic shift): image/caption pairs that do
    not belong together, on which policy and reference disagree only through their general drift. With one pair per
    batch the shift is the identity."""
    shifted = dict(batch)
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        if key in batch:
            shifted[key] = batch[key].roll(1, dims=0)
    return shifted


@torch.no_grad()
def mismatched_errors(
    models: Models, policy: UNet2DConditionModel, batch: dict, noise: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy, reference) errors of every image ([2B]) under a mismatched caption: KTO's KL estimate, as the KTO
    paper and TRL's KTOTrainer compute it (no gradient through it)."""
    shifted = mismatch_captions(batch)
    pol = pair_forward(policy, models.denoising, shifted, noise, timesteps)
    ref = reference_forward(models, policy, shifted, noise, timesteps)
    return torch.cat(pol.errors), torch.cat(ref.errors)
