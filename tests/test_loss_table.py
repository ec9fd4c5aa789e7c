"""The loss table is the one place a loss is described: the config's choices, flags and checks, the objective's
passes and defaults, and the per-family β all come from it, and it reproduces the hand-kept lists it replaced."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch

from schemas.config import TrainConfig, build_parser
from schemas.errors import InputError
from schemas.families import MODEL_FAMILIES
from schemas.loss_table import (
    INPUTS,
    LOSSES,
    NUM_TRAIN_TIMESTEPS,
    SDPO_LOSSES,
    FamilySetting,
    LossSpec,
    default_beta,
    family_setting,
)
from schemas.options import Resume
from trainer import train
from trainer.losses import LOSS_FUNCTIONS
from trainer.model import PairOutput
from trainer.objective import Objective

# What was kept by hand before the table, in schemas/config.py (TRAIN_LOSSES, SDPO_LOSSES), trainer/losses.py
# (REFERENCE_FREE, WINNERS_ONLY, LOSS_DEFAULTS) and trainer/objective.py (LOSS_FLAGS, the name tests in Objective).
TRAIN_LOSSES_BEFORE = ("dpo", "cdpo", "ipo", "hinge", "dmpo", "mapo", "sft", "diffusion", "kto", "dspo")
SDPO_LOSSES_BEFORE = {"dpo", "cdpo", "dmpo", "dspo"}
REFERENCE_FREE_BEFORE = {"mapo", "sft", "diffusion"}
WINNERS_ONLY_BEFORE = {"sft"}
BETA_BEFORE = {
    "dpo": {"sd15": 5000.0, "sdxl": 5000.0},
    "cdpo": {"sd15": 5000.0, "sdxl": 5000.0},
    "ipo": {"sd15": 5000.0, "sdxl": 5000.0},
    "hinge": {"sd15": 5000.0, "sdxl": 5000.0},
    "dmpo": {"sd15": 2000.0, "sdxl": 6000.0},
    "mapo": {"sd15": 0.1, "sdxl": 0.1},
    "kto": {"sd15": 1000.0, "sdxl": 1000.0},
    "dspo": {"sd15": 0.001, "sdxl": 0.001},
    "sft": {},
    "diffusion": {},
}
SDPO_MU_BEFORE = {"dpo": {"sd15": 0.9, "sdxl": 0.6}, "dspo": {"sd15": 0.2, "sdxl": 0.2}}
# the published parameters (MaPO's temperature was the scheduler's num_train_timesteps, set by the trainer)
PARAMS_BEFORE = {
    "cdpo": {"label_smoothing": 0.1},
    "dmpo": {"alpha": 0.01},
    "mapo": {"scale": 0.5},
    "kto": {"lambda_desirable": 1.0, "lambda_undesirable": 1.0},
}
LOSS_FLAGS_BEFORE = {
    "cdpo": {"label_smoothing": "label_smoothing"},
    "dmpo": {"dmpo_alpha": "alpha"},
    "mapo": {"mapo_scale": "scale", "mapo_temperature": "temperature"},
    "kto": {"kto_lambda_desirable": "lambda_desirable", "kto_lambda_undesirable": "lambda_undesirable"},
}
HELP_BEFORE = {
    "label_smoothing": "cdpo ε (default 0.1)",
    "dmpo_alpha": "dmpo α (default 0.01)",
    "mapo_scale": "mapo s (default 0.5)",
    "mapo_temperature": "mapo T (default: the scheduler's num_train_timesteps)",
    "kto_lambda_desirable": "kto λ_D (default 1)",
    "kto_lambda_undesirable": "kto λ_U (default 1)",
}


def test_the_table_gives_what_was_kept_by_hand() -> None:
    assert tuple(LOSSES) == TRAIN_LOSSES_BEFORE
    assert set(SDPO_LOSSES) == SDPO_LOSSES_BEFORE
    assert {name for name, spec in LOSSES.items() if not spec.reference} == REFERENCE_FREE_BEFORE
    assert {name for name, spec in LOSSES.items() if spec.winners_only} == WINNERS_ONLY_BEFORE
    for name, spec in LOSSES.items():
        betas = {
            family: s.beta
            for family, s in spec.families.items()
            if s.beta is not None and family in ("sd15", "sdxl")
        }
        assert betas == BETA_BEFORE[name], name
        mus = {family: s.sdpo_mu for family, s in spec.families.items() if s.sdpo_mu is not None}
        assert mus == SDPO_MU_BEFORE.get(name, {}), name
        published = {p.keyword: p.default for p in spec.params if p.default != NUM_TRAIN_TIMESTEPS}
        assert published == PARAMS_BEFORE.get(name, {}), name
        assert {p.flag: p.keyword for p in spec.params} == LOSS_FLAGS_BEFORE.get(name, {}), name
        for family in ("sd15", "sdxl"):
            assert default_beta(name, family) == BETA_BEFORE[name].get(family, 0.0)
    # the name tests that were inside Objective
    assert [n for n, s in LOSSES.items() if s.mismatched_pass] == ["kto"]
    assert [n for n, s in LOSSES.items() if s.soft_labels] == ["dpo"]
    assert {n: s.inputs for n, s in LOSSES.items() if s.inputs != "errors"} == {
        "kto": "per image",
        "dspo": "predictions",
    }


def test_every_entry_is_complete() -> None:
    """A function for each, a setting for each model family, and properties that fit together."""
    assert set(LOSS_FUNCTIONS) == set(LOSSES)
    for name, spec in LOSSES.items():
        assert LOSS_FUNCTIONS[name].__name__ == spec.function
        assert set(spec.families) == set(MODEL_FAMILIES), name
        assert spec.inputs in INPUTS and spec.source
        # the SDPO safeguard, KTO's extra pass and a winners-only policy pass all presuppose / exclude a reference
        assert not (spec.sdpo or spec.mismatched_pass) or spec.reference, name
        assert not spec.winners_only or not spec.reference, name


def test_the_config_derives_from_the_table() -> None:
    """`--loss` choices, each loss parameter's field (help, loss-only, refused on resume) and the --sdpo-mu check."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    assert by_name["loss"].metadata["choices"] == tuple(LOSSES)
    flags = {p.flag: (name, p) for name, spec in LOSSES.items() for p in spec.params}
    assert {n for n, f in by_name.items() if f.metadata["loss"]} == set(flags)
    for flag, (name, param) in flags.items():
        meta = by_name[flag].metadata
        assert (meta["loss"], meta["rule"], by_name[flag].default) == (name, Resume.REFUSED, None)
        assert meta["help"] == param.flag_help == HELP_BEFORE[flag]
    parser_help = build_parser(TrainConfig, "").format_help()
    assert "{" + ",".join(TRAIN_LOSSES_BEFORE) + "}" in parser_help
    assert (
        "wrap dpo, cdpo, dmpo or dspo in the Diffusion-SDPO safeguard" in by_name["sdpo_mu"].metadata["help"]
    )
    for name in LOSSES:
        if name in SDPO_LOSSES_BEFORE:
            TrainConfig(data="d", model="m", loss=name, sdpo_mu=0.5)
        else:
            with pytest.raises(
                InputError, match=f"--sdpo-mu wraps --loss cdpo/dmpo/dpo/dspo only, not {name}"
            ):
                TrainConfig(data="d", model="m", loss=name, sdpo_mu=0.5)
    with pytest.raises(InputError, match="--mapo-scale applies to --loss mapo only, not dpo"):
        TrainConfig(data="d", model="m", mapo_scale=0.3)


@pytest.mark.parametrize("name", TRAIN_LOSSES_BEFORE)
def test_the_objective_takes_its_passes_and_defaults_from_the_table(name: str) -> None:
    cfg = TrainConfig(data="d", model="m", loss=name)
    objective = Objective.from_config(cfg, "sdxl", 1000)
    expected = {**PARAMS_BEFORE.get(name, {}), **({"temperature": 1000.0} if name == "mapo" else {})}
    assert objective.params == expected
    assert objective.beta == BETA_BEFORE[name].get("sdxl", 0.0)
    assert objective.needs_reference == (name not in REFERENCE_FREE_BEFORE)
    assert objective.needs_losers == (name not in WINNERS_ONLY_BEFORE)
    assert objective.needs_mismatched_pass == (name == "kto")
    for flag, keyword in LOSS_FLAGS_BEFORE.get(name, {}).items():
        overridden = Objective.from_config(
            TrainConfig(data="d", model="m", loss=name, **{flag: 0.25}), "sd15", 9
        )
        assert overridden.params[keyword] == 0.25


def test_a_new_loss_is_one_entry_plus_its_function(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry the code has never seen: the objective runs its function with its published β and passes, and a
    family it does not support is refused with the entry's reason."""
    calls = []

    def toy_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, *, beta, scale=1.0):
        calls.append((ref_err_w, ref_err_l, beta, scale))
        return scale * (model_err_w - model_err_l).mean()

    spec = LossSpec(
        "toy_loss",
        {"sd15": FamilySetting(7.0), "sdxl": FamilySetting(unsupported="no published setting")},
        "this test",
        reference=False,
    )
    monkeypatch.setitem(LOSSES, "toy", spec)
    monkeypatch.setitem(LOSS_FUNCTIONS, "toy", toy_loss)
    cfg = TrainConfig(data="d", model="m")
    cfg.loss = "toy"
    objective = Objective.from_config(cfg, "sd15", 1000)
    assert (objective.beta, objective.params) == (7.0, {})
    assert (objective.needs_reference, objective.needs_losers, objective.needs_mismatched_pass) == (
        False,
        True,
        False,
    )
    err_w, err_l = torch.tensor([0.3, 0.5]), torch.tensor([0.4, 0.2])
    policy = PairOutput(err_w, err_l, torch.zeros(4, 1, 1, 1), torch.zeros(4, 1, 1, 1))
    loss, stats = objective(policy, None, torch.ones(2))
    assert loss.item() == pytest.approx(0.1) and calls == [(None, None, 7.0, 1.0)]
    assert set(stats) == {"policy_err_w", "policy_err_l"}
    with pytest.raises(InputError, match="--loss toy does not apply to sdxl models: no published setting"):
        family_setting("toy", "sdxl")


def test_a_loss_a_family_does_not_support_is_refused_before_any_work(
    tiny_sd15: Path,
    latent_sd15: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    families = {
        **LOSSES["ipo"].families,
        "sd15": FamilySetting(unsupported="its margin target assumes another loss"),
    }
    monkeypatch.setitem(LOSSES, "ipo", LossSpec("ipo_loss", families, "this test"))
    out = tmp_path / "run"
    argv = ["--data", str(latent_sd15), "--model", str(tiny_sd15), "--output-dir", str(out), "--loss", "ipo"]
    assert train.main(argv) == 2
    assert (
        "error: --loss ipo does not apply to sd15 models: its margin target assumes"
        in capsys.readouterr().err
    )
    assert not out.exists()


def test_flow_families_take_flow_dpo_and_refuse_what_has_no_flow_form() -> None:
    """SD3 and FLUX: DPO with flow_grpo's constant β 100 (and the margin losses that share its h = β·m/2), the
    plain denoising losses, and a refusal naming the reason for the rest."""
    for family in ("sd3", "flux"):
        for name in ("dpo", "cdpo", "ipo", "hinge"):
            assert default_beta(name, family) == 100.0
        for name in ("sft", "diffusion"):
            assert default_beta(name, family) == 0.0
        for name, reason in (("mapo", "DDPM"), ("kto", "SD1.5"), ("dspo", "epsilon"), ("dmpo", "fitted")):
            with pytest.raises(
                InputError, match=rf"--loss {name} does not apply to {family} models: .*{reason}"
            ):
                family_setting(name, family)
