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


def test_accuracy_by_group_splits_the_overall_accuracy(tiny_sd15: Path, latent_sd15: Path) -> None:
    from schemas.sample import pair_key

    models, _ = evaluate_cli.load_for_eval(str(tiny_sd15), None, None)
    policy = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    with torch.no_grad():
        policy.conv_out.bias.add_(0.05)
    models.reference, models.policy = models.policy, policy
    groups = {pair_key(1000 + i): "odd" if i % 2 else "even" for i in range(16)}
    groups.pop(pair_key(1003))  # a pair no group names counts only in the overall mean
    result = evaluate_cli.evaluate(models, policy, latent_sd15, max_pairs=16, groups=groups)
    by, count = result["accuracy_by_group"], result["pairs_by_group"]
    assert count == {"even": 8, "odd": 7}
    hits = {g: by[g] * count[g] for g in by}
    assert set(hits) == {"even", "odd"} and all(h == round(h) for h in hits.values())
    plain = evaluate_cli.evaluate(models, policy, latent_sd15, max_pairs=16)
    assert "accuracy_by_group" not in plain and plain["implicit_accuracy"] == result["implicit_accuracy"]
    assert sum(hits.values()) <= 16 * result["implicit_accuracy"] <= sum(hits.values()) + 1


def test_caption_gap_is_zero_for_a_unet_that_ignores_its_text(tiny_sd15: Path, latent_sd15: Path) -> None:
    """Oracle: with every cross-attention output zeroed, the text cannot reach the prediction, so both captions
    give exactly the same error; the random-init UNet does read its text."""
    models, unet = evaluate_cli.load_for_eval(str(tiny_sd15), None, None)
    reads = evaluate_cli.caption_gap(unet, models.scheduler, latent_sd15, max_pairs=12, draws=2)
    assert reads["num_pairs"] == 12 and reads["err_own_caption"] != reads["err_other_caption"]
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.zero_()
                module.bias.zero_()
    deaf = evaluate_cli.caption_gap(unet, models.scheduler, latent_sd15, max_pairs=12, draws=2)
    assert deaf["err_own_caption"] == deaf["err_other_caption"] and deaf["relative_gap"] == 0.0


def test_other_captions_picks_a_different_caption_or_none() -> None:
    prompts = torch.tensor([[1.0], [1.0], [2.0], [2.0], [1.0]])
    other = evaluate_cli._other_captions(prompts)
    assert other.tolist() == [2, 2, 4, 4, 2]
    assert evaluate_cli._other_captions(torch.ones(3, 1)).tolist() == [-1, -1, -1]
