"""`trainer.evaluate` gets the checks `trainer.train` has, before any model is loaded: counts that would measure
nothing, the model folder, the data against it (manifest, listed tars, family), damaged samples, the policy folders
and the resolution they were trained at, for --unet and --lora alike. Each refusal is exit 2 with one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedded.latent_dataset import write_latent_dataset
from schemas.errors import EXIT_INPUT
from tests.fixtures.cli_runs import assert_one_error_line, run_cli
from tests.fixtures.damage import flip_byte, poison_pairs
from trainer import evaluate as evaluate_cli


def _main(capsys: pytest.CaptureFixture[str], data: Path, model: Path, *extra: str | Path) -> str:
    """Runs evaluate in-process, expecting a refusal; returns its error line."""
    code = evaluate_cli.main(["--data", str(data), "--model", str(model), "--json", *map(str, extra)])
    captured = capsys.readouterr()
    assert code == EXIT_INPUT, captured.out + captured.err[-2000:]
    assert captured.out == ""
    return assert_one_error_line(captured.err)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--draws", "0"), ("--draws", "-2"), ("--batch-size", "0"), ("--max-pairs", "0"), ("--beta", "0")],
)
def test_a_count_that_measures_nothing_is_refused(
    flag: str, value: str, tiny_sd15: Path, latent_sd15: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No made-up result: zero draws used to print accuracy 0.5 and zero errors."""
    line = _main(capsys, latent_sd15, tiny_sd15, flag, value)
    assert f"{flag} must be" in line and value in line


def test_a_metric_over_zero_pairs_is_an_error(
    tiny_sd15: Path, latent_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every pair's latents NaN: no pair has finite errors, so there is no accuracy to report (never 0.5)."""
    data = Path(shutil.copytree(latent_sd15, tmp_path / "nan"))
    poison_pairs(data, 0, float("nan"))
    line = _main(capsys, data, tiny_sd15, "--max-pairs", "8")
    assert "no pair with finite errors" in line and "8 non-finite" in line


def _raw_parquet(tmp_path: Path) -> Path:
    folder = tmp_path / "parquet"
    folder.mkdir()
    pq.write_table(pa.table({"caption": ["a"], "label_0": [1.0]}), folder / "train-0.parquet")
    return folder


def test_data_that_is_not_a_whole_encode_output_is_refused(
    tiny_sd15: Path, latent_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The raw parquet folder, a manifest cut short, a shard deleted: exit 2 naming --data and the file."""
    parquet = _raw_parquet(tmp_path)
    assert "no manifest" in _main(capsys, parquet, tiny_sd15)
    cut = Path(shutil.copytree(latent_sd15, tmp_path / "cut"))
    os.truncate(cut / "manifest.json", 300)
    line = _main(capsys, cut, tiny_sd15)
    assert f"--data {cut}" in line and "manifest.json" in line
    gone = Path(shutil.copytree(latent_sd15, tmp_path / "gone"))
    shard = sorted((gone / "pairs").rglob("*.tar"))[0]
    shard.unlink()
    line = _main(capsys, gone, tiny_sd15)
    assert f"--data {gone}" in line and shard.name in line


def test_a_flipped_byte_names_the_shard_and_key(
    tiny_sd15: Path, latent_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = Path(shutil.copytree(latent_sd15, tmp_path / "flipped"))
    shard = sorted((data / "pairs").rglob("*.tar"))[0]
    key = flip_byte(shard, ".safetensors")
    line = _main(capsys, data, tiny_sd15)
    assert shard.name in line and key in line


def test_model_flags_are_checked_before_loading(
    tiny_sd15: Path, tiny_sdxl: Path, latent_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A local path is never sent to the hub; a part of a pipeline is not the pipeline; SDXL is not SD1.5."""
    assert "--model /nonexistent: the local folder does not exist" in _main(
        capsys, latent_sd15, "/nonexistent"
    )
    assert "no scheduler/" in _main(capsys, latent_sd15, tiny_sd15 / "unet")
    line = _main(capsys, latent_sd15, tiny_sdxl)
    assert "encoded for sd15" in line and "sdxl" in line
    assert "--unet" in _main(capsys, latent_sd15, tiny_sd15, "--unet", tmp_path, "--lora", tmp_path)


def test_lora_on_data_of_another_resolution_is_refused_like_unet(
    tiny_sd15: Path, lora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """RUN/final/lora records its training data beside it (final/run.json): a resolution other than 64 is refused,
    as it is for --unet RUN/checkpoints/step_N."""
    data = write_latent_dataset(tmp_path / "d128", num_pairs=4, resolution=128, latent_shape=(4, 16, 16))
    line = _main(capsys, data, tiny_sd15, "--lora", lora_run / "final" / "lora")
    assert "encoded at resolution 128" in line and "trained at 64" in line and "--lora" in line
    step = next((lora_run / "checkpoints").iterdir())
    assert "trained at 64" in _main(capsys, data, tiny_sd15, "--unet", step)


def test_damaged_policy_folders_are_named(
    tiny_sd15: Path, latent_sd15: Path, lora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint whose weights changed on disk, a truncated LoRA file: exit 2 naming them, not a traceback."""
    step = Path(shutil.copytree(next((lora_run / "checkpoints").iterdir()), tmp_path / "step"))
    weights = step / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 8)
    assert "the checkpoint is damaged (model.safetensors has" in _main(
        capsys, latent_sd15, tiny_sd15, "--unet", step
    )
    lora = Path(shutil.copytree(lora_run / "final" / "lora", tmp_path / "lora"))
    lora_weights = lora / evaluate_cli.LORA_WEIGHTS
    os.truncate(lora_weights, lora_weights.stat().st_size // 2)
    line = _main(capsys, latent_sd15, tiny_sd15, "--lora", lora)
    assert str(lora_weights) in line and "truncated" in line


def test_the_real_cli_refuses_in_one_line_and_scores_when_fixed(
    tiny_sd15: Path, latent_sd15: Path, lora_run: Path
) -> None:
    """As a user runs it: --draws 0 is exit 2 with one line; --draws 1 scores the run's LoRA on its own data."""
    args = (
        "--data",
        latent_sd15,
        "--model",
        tiny_sd15,
        "--lora",
        lora_run / "final" / "lora",
        "--max-pairs",
        "4",
    )
    refused = run_cli("trainer.evaluate", *args, "--json", "--draws", "0")
    assert refused.returncode == EXIT_INPUT
    assert_one_error_line(refused.stderr, "--draws must be >= 1, got 0")
    scored = run_cli("trainer.evaluate", *args, "--json", "--draws", "1")
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout.splitlines()[-1])["num_pairs"] == 4
