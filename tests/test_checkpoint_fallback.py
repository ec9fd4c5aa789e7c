"""A damaged newest checkpoint, and a disk or a permission that fails the trainer: real trainer processes on real
files (a deleted file, a truncation, a flipped byte, RLIMIT_FSIZE, a directory the process may not write).

Each case ends with the rerun of the same command finishing with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import resource
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas.errors import EXIT_INPUT
from schemas.failures import EXIT_ENVIRONMENT
from tests.fixtures.cli_runs import (
    assert_one_error_line,
    assert_same_final_weights,
    copy_run,
    run_cli,
    train_args,
)
from tests.fixtures.damage import flip_byte_at
from trainer import train

pytestmark = pytest.mark.slow


def _delete_optimizer(step: Path) -> None:
    (step / "optimizer.safetensors").unlink()


def _truncate_model(step: Path) -> None:
    path = step / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)


def _flip_model_byte(step: Path) -> None:
    # in the tensor data, not the header: safetensors itself opens the file fine, only the CRC-32 notices
    path = step / "model.safetensors"
    flip_byte_at(path, path.stat().st_size - 100)


DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "optimizer-missing": (_delete_optimizer, "optimizer.safetensors is missing"),
    "model-truncated": (_truncate_model, "model.safetensors has"),
    "model-byte-flipped": (_flip_model_byte, "model.safetensors fails its CRC-32 check"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_latest_passes_over_a_damaged_newest_checkpoint(
    damage: str, run_4_steps: Path, run_6_steps: Path, tiny_sd15: Path, latent_sd15: Path, tmp_path: Path
) -> None:
    """step_4 damaged: reported, the resume starts from step_2 saying so, and the run ends bit-identical to the
    uninterrupted one; the damaged checkpoint is replaced by a whole one on the way."""
    out = copy_run(run_4_steps, tmp_path / "run")
    newest = out / "checkpoints" / "step_00000004"
    apply, reason = DAMAGES[damage]
    apply(newest)
    proc = run_cli(
        "trainer.train", *train_args(latent_sd15, tiny_sd15, out, "--max-steps", "6", "--resume", "latest")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {newest} is damaged ({reason}" in proc.stderr
    assert f"falling back to {out / 'checkpoints' / 'step_00000002'}" in proc.stderr
    assert "at step 2" in proc.stdout
    assert_same_final_weights(run_6_steps, out)
    assert (newest / "optimizer.safetensors").is_file()


def test_a_damaged_checkpoint_named_by_resume_or_the_only_ones_are_refused(
    run_4_steps: Path, tiny_sd15: Path, latent_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--resume DIR` of a damaged checkpoint, and `--resume latest` when every checkpoint is damaged: exit 2
    naming the problem, nothing changed."""
    out = copy_run(run_4_steps, tmp_path / "run")
    steps = sorted((out / "checkpoints").iterdir())
    _delete_optimizer(steps[-1])
    assert train.main(train_args(latent_sd15, tiny_sd15, out, "--resume", str(steps[-1]))) == EXIT_INPUT
    assert_one_error_line(
        capsys.readouterr().err, f"--resume {steps[-1]}", "optimizer.safetensors is missing"
    )
    _truncate_model(steps[0])
    assert train.main(train_args(latent_sd15, tiny_sd15, out, "--resume", "latest")) == EXIT_INPUT
    assert_one_error_line(capsys.readouterr().err, "every checkpoint of run", "--overwrite-output-dir")
    assert not (steps[-1] / "optimizer.safetensors").exists()


def _small_file_limit(limit: int) -> Callable[[], None]:
    """RLIMIT_FSIZE, as `ulimit -f` sets it: a write past `limit` bytes fails with EFBIG (SIGXFSZ ignored, as a
    shell that set the limit leaves it)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_at_checkpoint_time_is_one_line_and_the_rerun_finishes(
    run_4_steps: Path, tiny_sd15: Path, latent_sd15: Path, tmp_path: Path
) -> None:
    """The first checkpoint (3 MB of UNet) cannot be written: one line naming the checkpoint folder and the size
    it needed, exit 74, no half-written step folder; the same command plus --resume latest ends with the weights
    of the run that never failed."""
    out = tmp_path / "run"
    args = train_args(latent_sd15, tiny_sd15, out)
    proc = run_cli("trainer.train", *args, preexec_fn=_small_file_limit(1 << 20))
    assert proc.returncode == EXIT_ENVIRONMENT, proc.stderr[-3000:]
    assert_one_error_line(
        proc.stderr, str(out / "checkpoints" / "step_00000002.tmp"), "File too large", "MiB"
    )
    assert list((out / "checkpoints").iterdir()) == [] and (out / "run.json").is_file()
    rerun = run_cli("trainer.train", *args, "--resume", "latest")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_final_weights(run_4_steps, out)


def _without_root_override() -> tuple[str, ...]:
    """root writes anywhere; without CAP_DAC_OVERRIDE it meets file modes like any user."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a file mode cannot refuse a write")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")


def test_permission_denied_is_one_line(tiny_sd15: Path, latent_sd15: Path, tmp_path: Path) -> None:
    """--output-dir inside a folder the process may not write: exit 74 naming the folder, no traceback."""
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = run_cli(
            "trainer.train",
            *train_args(latent_sd15, tiny_sd15, parent / "run"),
            prefix=_without_root_override(),
        )
    finally:
        parent.chmod(0o755)
    assert proc.returncode == EXIT_ENVIRONMENT, proc.stderr[-3000:]
    assert_one_error_line(proc.stderr, str(parent / "run"), "Permission denied")
