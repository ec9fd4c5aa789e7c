"""The loss table: one entry per `--loss`, everything the config and the trainer need to know about it.

An entry names its function in trainer/losses.py (bound there by name, so this half imports nothing of the trainer),
what the step must run for it (the reference pass, the losers, KTO's extra pass), whether `--sdpo-mu` can wrap it,
its published β per model family, and its own parameters with the TrainConfig flag that overrides each. TrainConfig's
`--loss` choices and checks, the parameter flags' help lines, the objective's passes and defaults, and the resume
rule's "β unset means the published value" all derive from it: a new loss is one entry plus its function.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.errors import InputError

# How the objective calls a loss's function, by what the function reads:
# the four per-pair errors (policy / reference × winner / loser): fn(e_w, e_l, ref_w, ref_l, *, beta, **params)
ERRORS = "errors"
# each image's errors with a desirable/undesirable label and a reference point (Diffusion-KTO)
PER_IMAGE = "per image"
# the winner's prediction tensors as well as the four errors (DSPO)
PREDICTIONS = "predictions"
INPUTS = (ERRORS, PER_IMAGE, PREDICTIONS)
# a parameter default that is the scheduler's num_train_timesteps (MaPO's T), resolved by the trainer
NUM_TRAIN_TIMESTEPS = "num_train_timesteps"


@dataclass(frozen=True)
class LossParam:
    """One hyper-parameter of a loss: the function's keyword, the TrainConfig field (and flag) that overrides it,
    and its published default."""

    keyword: str
    flag: str
    # a number, or NUM_TRAIN_TIMESTEPS
    default: float | str
    # the flag's help line, without its default
    help: str

    @property
    def flag_help(self) -> str:
        if self.default == NUM_TRAIN_TIMESTEPS:
            return f"{self.help} (default: the scheduler's {NUM_TRAIN_TIMESTEPS})"
        return f"{self.help} (default {self.default:g})"


@dataclass(frozen=True)
class FamilySetting:
    """A loss on one model family: its published β and `--sdpo-mu` (None: it has none), or why it does not apply."""

    beta: float | None = None
    # the published μ for the SDPO safeguard; off unless --sdpo-mu is given
    sdpo_mu: float | None = None
    # the reason, printed when the loss is refused for this family
    unsupported: str | None = None


@dataclass(frozen=True)
class LossSpec:
    """One `--loss`: its function, what the step runs for it, its published settings and its parameters."""

    # its name in trainer/losses.py
    function: str
    # every model family (schemas.manifest.MODEL_FAMILIES) has a setting, supported or not
    families: dict[str, FamilySetting]
    # where the formula and the defaults come from
    source: str
    # how the objective calls the function: one of INPUTS
    inputs: str = ERRORS
    # the frozen reference's pass (reference-free losses load no reference UNet at all)
    reference: bool = True
    # the losses are never read: the policy pass runs over the winners alone (half the compute)
    winners_only: bool = False
    # KTO's one more no-grad pass of policy and reference over mismatched captions (--kto-reference-point mismatched)
    mismatched_pass: bool = False
    # --sdpo-mu may wrap it (it needs the reference and reads the losers' errors)
    sdpo: bool = False
    # a kept tie trains as a soft label p = 0.5 (the pair's `label`)
    soft_labels: bool = False
    params: tuple[LossParam, ...] = ()


def _both(beta: float | None = None, **setting: float) -> dict[str, FamilySetting]:
    """The same setting for SD1.5 and SDXL."""
    return {"sd15": FamilySetting(beta, **setting), "sdxl": FamilySetting(beta, **setting)}


# Flow-DPO: the DPO loss on mean squared velocity errors with a constant β (VideoAlign's Flow-DPO), 100 in
# yifan123/flow_grpo config/dpo.py for SD3.5-medium at 512 px, on this project's h = β·m/2 scale (its
# `inside_term = -0.5 * beta * w_l_diff`). No FLUX preference script publishes a β; flow_grpo#47 reports 500
# spiking on a FLUX LoRA and its maintainer suggests 2000, so FLUX takes SD3.5's until one is published.
FLOW_DPO_BETA = 100.0


def _flow(beta: float | None = None) -> dict[str, FamilySetting]:
    """The same setting for the flow-matching families."""
    return {"sd3": FamilySetting(beta), "flux": FamilySetting(beta)}


def _not_flow(reason: str) -> dict[str, FamilySetting]:
    return {"sd3": FamilySetting(unsupported=reason), "flux": FamilySetting(unsupported=reason)}


# the margin losses share DPO's h = β·m/2, so on flow errors they take Flow-DPO's β
_FLOW_MARGIN = _flow(FLOW_DPO_BETA)


_DIFFUSERS_DPO = (
    "huggingface/diffusers research_projects/diffusion_dpo (--beta_dpo 2500 on its scale = 5000 here)"
)

LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(
        "dpo_loss",
        {
            "sd15": FamilySetting(5000.0, sdpo_mu=0.9),
            "sdxl": FamilySetting(5000.0, sdpo_mu=0.6),
            **_flow(FLOW_DPO_BETA),
        },
        "SalesforceAIResearch/DiffusionDPO launchers/sd15.sh, sdxl.sh (β); "
        "AIDC-AI/Diffusion-SDPO scripts/train/*_diffusion_dpo.sh (μ); yifan123/flow_grpo config/dpo.py (flow β)",
        sdpo=True,
        soft_labels=True,
    ),
    "cdpo": LossSpec(
        "cdpo_loss",
        {**_both(5000.0), **_FLOW_MARGIN},
        "eric-mitchell/direct-preference-optimization trainers.py (form); β as dpo; ε 0.1 as in issue 13",
        sdpo=True,
        params=(LossParam("label_smoothing", "label_smoothing", 0.1, "cdpo ε"),),
    ),
    "ipo": LossSpec("ipo_loss", {**_both(5000.0), **_FLOW_MARGIN}, _DIFFUSERS_DPO),
    "hinge": LossSpec("hinge_loss", {**_both(5000.0), **_FLOW_MARGIN}, _DIFFUSERS_DPO),
    "dmpo": LossSpec(
        "dmpo_loss",
        {
            "sd15": FamilySetting(2000.0),
            "sdxl": FamilySetting(6000.0),
            **_not_flow(
                "its α and β were fitted to SD1.5/SDXL epsilon errors; no flow-matching setting is published"
            ),
        },
        "AIDC-AI/Diffusion-SDPO scripts/train/sd15_dmpo.sh, sdxl_dmpo.sh",
        sdpo=True,
        params=(LossParam("alpha", "dmpo_alpha", 0.01, "dmpo α"),),
    ),
    "mapo": LossSpec(
        "mapo_loss",
        {
            **_both(0.1),
            **_not_flow(
                "its f(e) = s·e/(e^(s·e) - 1) and T = num_train_timesteps are set for DDPM epsilon errors; velocity "
                "errors are ~10x larger and no flow-matching setting is published"
            ),
        },
        "mapo-t2i/mapo args.py (beta_mapo 0.1, snr_value 0.5), utils.py compute_loss (T)",
        reference=False,
        params=(
            LossParam("scale", "mapo_scale", 0.5, "mapo s"),
            LossParam("temperature", "mapo_temperature", NUM_TRAIN_TIMESTEPS, "mapo T"),
        ),
    ),
    "sft": LossSpec(
        "sft_loss",
        {**_both(), **_flow()},
        "SalesforceAIResearch/DiffusionDPO --sft",
        reference=False,
        winners_only=True,
    ),
    "diffusion": LossSpec(
        "diffusion_loss",
        {**_both(), **_flow()},
        "plain denoising (flow matching) of both images",
        reference=False,
    ),
    "kto": LossSpec(
        "kto_loss",
        {**_both(1000.0), **_not_flow("Diffusion-KTO's β and reference point are published for SD1.5 only")},
        "jacklishufan/diffusion-kto train_kto_sd_v1.5.py argparse (beta_dpo 1000, lambda_d/u 1)",
        inputs=PER_IMAGE,
        mismatched_pass=True,
        params=(
            LossParam("lambda_desirable", "kto_lambda_desirable", 1.0, "kto λ_D"),
            LossParam("lambda_undesirable", "kto_lambda_undesirable", 1.0, "kto λ_U"),
        ),
    ),
    "dspo": LossSpec(
        "dspo_loss",
        {
            **_both(0.001, sdpo_mu=0.2),
            **_not_flow("its score-matching term is written for epsilon prediction (eps_theta - eps)"),
        },
        "huaishengzhu/DSPO launchers/sd15.sh (β 0.001; SDXL's 5000 belongs to its other formula); "
        "AIDC-AI/Diffusion-SDPO scripts/train/sd15_dspo.sh (μ)",
        inputs=PREDICTIONS,
        sdpo=True,
    ),
}
# the losses --sdpo-mu can wrap
SDPO_LOSSES = tuple(name for name, spec in LOSSES.items() if spec.sdpo)


def loss_param(flag: str) -> tuple[str, LossParam]:
    """The loss and parameter that TrainConfig field `flag` overrides."""
    for name, spec in LOSSES.items():
        for param in spec.params:
            if param.flag == flag:
                return name, param
    raise KeyError(f"no loss has a parameter flag {flag!r}")


def family_setting(loss: str, family: str) -> FamilySetting:
    """`loss` on `family`; an InputError naming both and the reason when the loss does not apply to it."""
    setting = LOSSES[loss].families[family]
    if setting.unsupported:
        raise InputError(f"--loss {loss} does not apply to {family} models: {setting.unsupported}")
    return setting


def default_beta(loss: str, family: str) -> float:
    """The published β for `loss` on `family`; losses without a β get 0 (unused)."""
    beta = family_setting(loss, family).beta
    return 0.0 if beta is None else beta
