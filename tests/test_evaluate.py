"""Held-out evaluation: the reference scores exactly 0.5, results repeat exactly, and --unet / --lora are scored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import UNet2DConditionModel

from embedded.latent_dataset import write_latent_dataset
from schemas.config import TrainConfig
from schemas.errors import InputError
from tests.fixtures.damage import poison_pairs
from trainer import evaluate as evaluate_cli
from trainer.checkpoint import TrainState, save_checkpoint
from trainer.model import load_models


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
    # per-pair noise: another batch size draws the same noise, and moves the errors by float rounding only
    # (batched convolutions; 1e-8 relative measured), the README's "to float rounding"
    again = _run(capsys, *base, "--batch-size", "4")
    assert (
        again == pytest.approx(first, rel=1e-7) and again["implicit_accuracy"] == first["implicit_accuracy"]
    )
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
    assert (
        evaluate_cli.main(["--data", str(latent_sd15), "--model", str(tiny_sd15), "--lora", str(tmp_path)])
        == 2
    )
    assert "no pytorch_lora_weights" in capsys.readouterr().err


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
    reads = evaluate_cli.caption_gap(unet, models.denoising, latent_sd15, max_pairs=12, draws=2)
    assert reads["num_pairs"] == 12 and reads["err_own_caption"] != reads["err_other_caption"]
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.zero_()
                module.bias.zero_()
    deaf = evaluate_cli.caption_gap(unet, models.denoising, latent_sd15, max_pairs=12, draws=2)
    assert deaf["err_own_caption"] == deaf["err_other_caption"] and deaf["relative_gap"] == 0.0


def test_caption_gap_is_one_pass_over_the_preferred_images(tiny_sd15: Path, latent_sd15: Path) -> None:
    """Per draw the UNet sees the preferred images once under their own captions and once under the other ones,
    2 x pairs samples (the losers, never scored, are not run); the errors are those of plain UNet calls by hand:
    noise-prediction MSE under each caption, with the same noise and timestep."""
    models, unet = evaluate_cli.load_for_eval(str(tiny_sd15), None, None)
    seen: list[int] = []
    hook = unet.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    gap = evaluate_cli.caption_gap(unet, models.denoising, latent_sd15, batch_size=12, max_pairs=12, draws=2)
    hook.remove()
    assert sum(seen) == 2 * 12 * 2 and gap["num_pairs"] == 12
    batch = next(evaluate_cli.iter_eval_batches(latent_sd15, batch_size=12, max_pairs=12))
    other = evaluate_cli._other_captions(batch["prompt_embeds"])
    assert (other >= 0).all()
    errors = {"own": torch.zeros(12), "other": torch.zeros(12)}
    with torch.no_grad():
        for draw in range(2):
            noise, t = evaluate_cli.draw_eval_noise(batch, models.denoising, seed=0, draw=draw)
            noisy = models.scheduler.add_noise(batch["w_latents"], noise, t)
            for name, captions in (("own", batch["prompt_embeds"]), ("other", batch["prompt_embeds"][other])):
                pred = unet(noisy, t, encoder_hidden_states=captions).sample
                errors[name] += (pred - noise).pow(2).mean(dim=(1, 2, 3)) / 2
    assert gap["err_own_caption"] == pytest.approx(float(errors["own"].mean()), rel=1e-5)
    assert gap["err_other_caption"] == pytest.approx(float(errors["other"].mean()), rel=1e-5)


def test_other_captions_picks_a_different_caption_or_none() -> None:
    prompts = torch.tensor([[1.0], [1.0], [2.0], [2.0], [1.0]])
    other = evaluate_cli._other_captions(prompts)
    assert other.tolist() == [2, 2, 4, 4, 2]
    assert evaluate_cli._other_captions(torch.ones(3, 1)).tolist() == [-1, -1, -1]


def test_non_finite_pairs_are_left_out_and_the_json_is_strict(tiny_sd15: Path, tmp_path: Path) -> None:
    """NaN latents in a quarter of the pairs: the CLI (a real process) prints strict JSON, counts them, warns."""
    data = write_latent_dataset(tmp_path / "d", num_pairs=16, shard_size=8)
    poisoned = poison_pairs(data, 0, float("nan"), every=2)
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", "--data", str(data), "--model", str(tiny_sd15), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    def refuse(token: str) -> None:
        raise AssertionError(f"bare {token} in the output")

    result = json.loads(proc.stdout, parse_constant=refuse)
    assert result["non_finite_pairs"] == len(poisoned) == 4 and result["num_pairs"] == 12
    assert result["implicit_accuracy"] == 0.5  # the reference against itself, over the finite pairs
    assert "4 pairs with non-finite errors were left out" in proc.stderr


def test_strict_json_turns_non_finite_into_null() -> None:
    line = evaluate_cli.strict_json({"a": float("nan"), "b": float("inf"), "c": 1.5, "n": 3})
    assert json.loads(line) == {"a": None, "b": None, "c": 1.5, "n": 3}


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_a_training_checkpoint_can_be_evaluated(
    tiny_sd15: Path, latent_sd15: Path, tmp_path: Path, lora_rank: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """--unet RUN/checkpoints/step_N scores exactly what the same weights score when exported as a UNet folder."""
    models = load_models(str(tiny_sd15), lora_rank=lora_rank, need_reference=False)
    with torch.no_grad():
        for name, p in models.policy.named_parameters():
            if p.requires_grad and ("lora_B" in name or name == "conv_out.bias"):
                p.add_(0.05)
    optimizer = torch.optim.AdamW([p for p in models.policy.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    config = asdict(TrainConfig(model=str(tiny_sd15), data=str(latent_sd15), lora_rank=lora_rank))
    state = {"config": config, "data": {"resolution": 64}}
    accelerator = Accelerator(cpu=True)
    ckpt = save_checkpoint(
        accelerator, tmp_path, TrainState(3, 3), models.policy, optimizer, scheduler, state, 0
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    merged = models.policy
    if lora_rank:
        merged.fuse_lora()
        merged.unload_lora()
    merged.save_pretrained(tmp_path / "exported")
    base = ["--data", str(latent_sd15), "--model", str(tiny_sd15), "--max-pairs", "8"]
    from_checkpoint = _run(capsys, *base, "--unet", str(ckpt))
    exported = _run(capsys, *base, "--unet", str(tmp_path / "exported"))
    assert from_checkpoint["policy_err_w"] != from_checkpoint["ref_err_w"]
    for k in ("policy_err_w", "policy_err_l", "ref_err_w", "ref_err_l"):
        assert from_checkpoint[k] == pytest.approx(exported[k], rel=1e-4), k
    assert evaluate_cli.main([*base, "--unet", str(tmp_path)]) == 2
    assert "neither a UNet folder" in capsys.readouterr().err


def test_eval_data_at_another_resolution(
    tiny_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused against the resolution a checkpoint was trained at; a loud warning against the UNet's native size."""
    data = write_latent_dataset(tmp_path / "d128", num_pairs=4, resolution=128, latent_shape=(4, 16, 16))
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "run.json").write_text(json.dumps({"data": {"resolution": 64}}))
    with pytest.raises(
        InputError, match=r"encoded at resolution 128, the policy \(--unet \S+\) was trained at 64"
    ):
        evaluate_cli.check_trained_resolution(data, 128, "--unet", str(tmp_path / "final" / "unet"))
    assert evaluate_cli.main(["--data", str(data), "--model", str(tiny_sd15), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["num_pairs"] == 4
    assert "encoded at resolution 128, the UNet's native size is 64" in out.err
