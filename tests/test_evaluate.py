"""Held-out evaluation: the reference scores exactly 0.5, results repeat exactly, and --unet / --lora are scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from trainer import evaluate as evaluate_cli


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert evaluate_cli.main([*args, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1  # one JSON line, nothing else on stdout
    return json.loads(lines[0])


def test_reference_scores_half_and_repeats(
    tiny_sd15: Path, latent_sd15: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--data", str(latent_sd15), "--model", str(tiny_sd15), "--max-pairs", "12"]
    first = _run(capsys, *base, "--batch-size", "5")
    assert first["implicit_accuracy"] == 0.5 and first["reward_margin"] == 0.0 and first["num_pairs"] == 12
    assert first["policy_err_w"] == first["ref_err_w"] > 0
    again = _run(capsys, *base, "--batch-size", "4")  # per-pair noise: batch size does not matter
    assert again["ref_err_w"] == pytest.approx(first["ref_err_w"], rel=1e-6)
    assert _run(capsys, *base, "--batch-size", "5") == first
    other_seed = _run(capsys, *base, "--batch-size", "5", "--seed", "1")
    assert other_seed["ref_err_w"] != first["ref_err_w"]


def test_scores_a_changed_unet(
    tiny_sd15: Path, latent_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.05)
    unet.save_pretrained(tmp_path / "unet")
    result = _run(
        capsys,
        "--data",
        str(latent_sd15),
        "--model",
        str(tiny_sd15),
        "--unet",
        str(tmp_path / "unet"),
        "--max-pairs",
        "16",
        "--beta",
        "5000",
    )
    assert result["policy_err_w"] != result["ref_err_w"]
    assert result["implicit_accuracy"] != 0.5 or result["reward_margin"] != 0.0
    with pytest.raises(SystemExit, match="no pytorch_lora_weights"):
        evaluate_cli.main(["--data", str(latent_sd15), "--model", str(tiny_sd15), "--lora", str(tmp_path)])


def test_draws_average_the_errors_of_independent_draws(
    tiny_sd15: Path, latent_sd15: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--data", str(latent_sd15), "--model", str(tiny_sd15), "--max-pairs", "8"]
    one = _run(capsys, *base, "--draws", "1")
    three = _run(capsys, *base, "--draws", "3")
    assert three["implicit_accuracy"] == 0.5 and three["reward_margin"] == 0.0
    assert three["ref_err_w"] != one["ref_err_w"]  # the extra draws are new noise, not repeats of the first
    assert _run(capsys, *base, "--draws", "3") == three
