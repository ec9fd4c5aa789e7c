"""Every `--loss` on the real trainer and the tiny SD1.5 model: it trains, resumes bit-exactly, runs exactly the UNet
passes it needs (no reference UNet at all for mapo and sft), and evaluation reports its implicit accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.nn.modules.module import register_module_forward_hook

from schemas.loss_table import LOSSES
from tests.test_train import (  # noqa: F401 (autouse fixture)
    _fresh_accelerate_state,
    assert_scores_the_export,
    final_weights,
    run_train,
)
from trainer import train
from trainer.objective import mismatch_captions

CASES = [(name, ()) for name in LOSSES] + [
    ("dpo", ("--sdpo-mu", "0.9")),
    ("dspo", ("--sdpo-mu", "0.2")),
    ("kto", ("--kto-reference-point", "batch")),
    ("cdpo", ("--label-smoothing", "0.2", "--beta", "100")),
]
# UNet forwards per micro-step: policy, reference, and KTO's mismatched pass of both
PASSES = {"mapo": 1, "sft": 1, "diffusion": 1, "kto": 4}


class UnetCalls:
    """Counts UNet2DConditionModel forwards and from_pretrained loads while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.forwards = self.loads = 0
        original = UNet2DConditionModel.from_pretrained.__func__

        def counting(cls, *args, **kwargs):
            self.loads += 1
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(counting))
        self._hook = register_module_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        if isinstance(module, UNet2DConditionModel):
            self.forwards += 1

    def close(self) -> None:
        self._hook.remove()


def _case_id(case: tuple[str, tuple[str, ...]]) -> str:
    return "-".join([case[0], *(a.lstrip("-") for a in case[1])])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_each_loss_trains_resumes_and_evaluates(
    case: tuple[str, tuple[str, ...]],
    tiny_sd15: Path,
    latent_sd15: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name, extra = case
    common = ("--loss", name, *extra, "--checkpoint-every", "1", "--num-workers", "0", "--batch-size", "3")
    calls = UnetCalls(monkeypatch)
    try:
        run_train(latent_sd15, tiny_sd15, tmp_path / "straight", "--max-steps", "2", *common)
    finally:
        calls.close()
    passes = PASSES.get(name, 2) if "batch" not in extra else 2
    assert calls.forwards == 2 * passes
    assert calls.loads == (1 if passes == 1 else 2)  # the reference-free losses load no reference UNet

    run_train(latent_sd15, tiny_sd15, tmp_path / "split", "--max-steps", "1", *common)
    capsys.readouterr()
    held_out = ("--val-data", str(latent_sd15), "--eval-max-pairs", "6")
    run_train(
        latent_sd15,
        tiny_sd15,
        tmp_path / "split",
        "--max-steps",
        "2",
        "--resume",
        "latest",
        *common,
        *held_out,
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    trained = UNet2DConditionModel.from_pretrained(tmp_path / "straight" / "final" / "unet").state_dict()
    original = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original)

    # the resumed run's own evaluation at its end scores the same policy as trainer.evaluate of the export, against
    # the base model (not itself)
    held = {k.removeprefix("eval_"): v for k, v in summary.items() if k.startswith("eval_")}
    assert held["num_pairs"] == 6
    assert_scores_the_export(held, tiny_sd15, tmp_path / "straight", latent_sd15, max_pairs=6)


@pytest.mark.parametrize("name", ["mapo", "sft"])
def test_reference_free_eval_during_training_uses_the_base_model(
    name: str, tiny_sd15: Path, latent_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_train(
        latent_sd15,
        tiny_sd15,
        tmp_path,
        "--loss",
        name,
        "--max-steps",
        "1",
        "--checkpoint-every",
        "0",
        "--num-workers",
        "0",
        "--val-data",
        str(latent_sd15),
        "--eval-max-pairs",
        "6",
    )
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("eval "))
    result = json.loads(line.removeprefix("eval "))
    assert result["policy_err_w"] != result["ref_err_w"]


def test_mismatched_captions_shift_by_one_pair() -> None:
    batch = {"prompt_embeds": torch.arange(3.0)[:, None], "w_latents": torch.arange(3.0)}
    shifted = mismatch_captions(batch)
    assert shifted["prompt_embeds"].flatten().tolist() == [2.0, 0.0, 1.0]
    assert shifted["w_latents"] is batch["w_latents"] and batch["prompt_embeds"].flatten().tolist() == [
        0,
        1,
        2,
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loss", "nope"], "--loss must be one of"),
        (["--loss", "dpo", "--dmpo-alpha", "0.1"], "--dmpo-alpha applies to --loss dmpo only"),
        (["--loss", "ipo", "--sdpo-mu", "0.5"], "--sdpo-mu wraps --loss"),
        (["--loss", "dpo", "--sdpo-mu", "1.5"], "--sdpo-mu must be in"),
        (["--loss", "kto", "--kto-reference-point", "x"], "--kto-reference-point must be one of"),
        (["--loss", "dpo", "--beta", "0"], "--beta must be > 0"),
    ],
)
def test_objective_flags_are_checked(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad objective flag is a usage error (exit 2) whose message names the flag, before any work starts."""
    assert train.main(["--data", str(tmp_path), "--model", "m", *args]) == 2
    assert message in capsys.readouterr().err
