"""`trainer.train` checks every flag and input before it writes anything: a name only a library knows (the lr
schedule, the tracker), the model folder and its weight files, the data's listed tars, the config file. Each
refusal is exit 2 with one line naming the flag or file, and leaves --output-dir as it was, so the corrected
command runs without --overwrite-output-dir."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas.errors import EXIT_INPUT
from tests.fixtures.cli_runs import assert_one_error_line, run_cli, train_args
from trainer import train


def _copy_data(latent: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(latent, tmp_path / "data"))


def _copy_model(model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / "model"))


def _uninstalled_tracker() -> str:
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    installed = set(get_available_trackers())
    missing = [t.value for t in LoggerType if t is not LoggerType.ALL and t not in installed]
    if not missing:
        pytest.skip("every accelerate tracker is installed here")
    return missing[0]


# case -> (build the argv from data, model, tmp_path; the texts the error line must hold)
Case = Callable[[Path, Path, Path], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {
    "lr-scheduler-unknown": lambda d, m, t: (
        ["--lr-scheduler", "bogus"],
        ["--lr-scheduler 'bogus'", "cosine"],
    ),
    # diffusers knows it, but it needs step rules this trainer does not take
    "lr-scheduler-piecewise": lambda d, m, t: (["--lr-scheduler", "piecewise_constant"], ["--lr-scheduler"]),
    "report-to-unknown": lambda d, m, t: (["--report-to", "bogus"], ["--report-to 'bogus'", "tensorboard"]),
    "report-to-not-installed": lambda d, m, t: (
        ["--report-to", (name := _uninstalled_tracker())],
        [f"--report-to {name}", "not installed"],
    ),
    "model-a-part-of-the-pipeline": lambda d, m, t: (
        ["--model", str(m / "unet")],
        [f"--model {m / 'unet'}", "no scheduler/"],
    ),
    "model-not-there": lambda d, m, t: (
        ["--model", "/nonexistent"],
        ["--model /nonexistent", "local folder does not exist"],
    ),
    "model-a-file": lambda d, m, t: (["--model", str(m / "model_index.json")], ["is a file"]),
    "config-missing": lambda d, m, t: (["--config", str(t / "nope.toml")], [f"--config {t / 'nope.toml'}"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_flag_is_refused_before_anything_is_written(
    case: str,
    tiny_sd15: Path,
    latent_sd15: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    extra, needles = CASES[case](latent_sd15, tiny_sd15, tmp_path)
    out = tmp_path / "run"
    assert train.main(train_args(latent_sd15, tiny_sd15, out, *extra)) == EXIT_INPUT
    assert_one_error_line(capsys.readouterr().err, *needles)
    assert not out.exists()


def test_a_config_file_that_does_not_parse_is_exit_2_naming_it(
    tiny_sd15: Path, latent_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, text in (
        ("bad.toml", "max_steps = = 3\n"),
        ("bad.json", '{"max_steps": '),
        ("list.json", "[1]"),
    ):
        config = tmp_path / name
        config.write_text(text)
        args = ["--config", str(config), *train_args(latent_sd15, tiny_sd15, tmp_path / "run")]
        assert train.main(args) == EXIT_INPUT, name
        assert_one_error_line(capsys.readouterr().err, f"--config {config}")


def _delete_text_tar(data: Path) -> str:
    tar = next((data / "text").rglob("*.tar"))
    tar.unlink()
    return tar.name


def _delete_pair_shard(data: Path) -> str:
    tar = sorted((data / "pairs").rglob("*.tar"))[-1]
    tar.unlink()
    return tar.name


def _truncate_manifest(data: Path) -> str:
    manifest = data / "manifest.json"
    os.truncate(manifest, manifest.stat().st_size // 2)
    return "manifest.json"


@pytest.mark.parametrize(
    "damage", [_delete_text_tar, _delete_pair_shard, _truncate_manifest], ids=lambda f: f.__name__[1:]
)
def test_data_missing_a_listed_file_is_refused_before_the_run_starts(
    damage: Callable[[Path], str],
    tiny_sd15: Path,
    latent_sd15: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A text tar or pair shard deleted from an encode output, or its manifest cut short: found by preflight,
    not by the loader after run.json was written."""
    data = _copy_data(latent_sd15, tmp_path)
    name = damage(data)
    out = tmp_path / "run"
    assert train.main(train_args(data, tiny_sd15, out)) == EXIT_INPUT
    assert_one_error_line(capsys.readouterr().err, f"--data {data}", name)
    assert not out.exists()


def test_a_truncated_weight_file_is_named(
    tiny_sd15: Path, latent_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _copy_model(tiny_sd15, tmp_path)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    out = tmp_path / "run"
    assert train.main(train_args(latent_sd15, model, out)) == EXIT_INPUT
    assert_one_error_line(capsys.readouterr().err, str(weights), "truncated")
    assert not out.exists()


def test_the_corrected_command_runs_without_overwrite(
    tiny_sd15: Path, latent_sd15: Path, tmp_path: Path
) -> None:
    """The real CLI: refused with exit 2 and one line, then the same command with the flag fixed trains."""
    out = tmp_path / "run"
    args = train_args(latent_sd15, tiny_sd15, out, "--max-steps", "1", "--checkpoint-every", "0")
    refused = run_cli("trainer.train", *args, "--lr-scheduler", "cosinus")
    assert refused.returncode == EXIT_INPUT
    assert_one_error_line(refused.stderr, "--lr-scheduler 'cosinus'")
    fixed = run_cli("trainer.train", *args, "--lr-scheduler", "cosine")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert (out / "final" / "unet").is_dir()
