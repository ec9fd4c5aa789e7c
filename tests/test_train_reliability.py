"""The real trainer CLI under what users do next: SIGTERM/SIGINT (preemption, Ctrl-C, torchrun), reruns into a run
directory, two trainers on one directory. Every run is `python -m trainer.train` (or torchrun) in its own process,
and every signal a real one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from schemas.storage import read_json
from trainer.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WDS_SECURE": "1", "PYTHONPATH": str(ROOT)}
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def cli(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    """Batch 2 with gradient accumulation 2 and a loader worker (a process of its own, in the trainer's group)."""
    return [
        *("-m", "trainer.train", "--data", str(data), "--model", str(model), "--output-dir", str(out)),
        *(
            "--max-steps",
            "6",
            "--batch-size",
            "2",
            "--gradient-accumulation-steps",
            "2",
            "--num-workers",
            "1",
        ),
        *("--checkpoint-every", "0", "--learning-rate", "1e-3", "--no-scale-lr", "--lr-warmup-steps", "0"),
        *("--report-to", "none", *extra),
    ]


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=600)


def start(args: list[str], out: Path) -> subprocess.Popen[str]:
    """A trainer in a session of its own (as under a scheduler); returns once it has claimed `out` (run.json),
    which it does after installing its signal handlers and before loading the models."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    while not (out / "run.json").exists():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    return proc


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def straight(tiny_sd15: Path, latent_sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = run(cli(latent_sd15, tiny_sd15, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize(
    ("sig", "to_group"),
    [(signal.SIGTERM, True), (signal.SIGINT, False)],
    ids=["SIGTERM-to-the-process-group", "SIGINT-to-the-trainer"],
)
def test_signal_finishes_the_step_checkpoints_and_resumes_bit_identical(
    tiny_sd15: Path, latent_sd15: Path, straight: Path, tmp_path: Path, sig: signal.Signals, to_group: bool
) -> None:
    """SIGTERM to the whole group (scancel, torchrun, kill -- -PGID: the loader worker gets it too) or SIGINT to
    the trainer: it finishes the step, writes a checkpoint atomically, exits 75; --resume latest then ends with
    exactly the weights of the uninterrupted run."""
    out = tmp_path / "run"
    proc = start(cli(latent_sd15, tiny_sd15, out), out)
    if to_group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert f"received {sig.name}" in stderr and "--resume latest" in stderr
    saved = checkpoints(out)
    assert len(saved) == 1 and not saved[0].endswith(".tmp")  # the step in progress, and nothing half-written
    step = read_json(out / "checkpoints" / saved[0] / "state.json")["global_step"]
    assert 1 <= step < 6 and not (out / "final").exists()

    resumed = run(cli(latent_sd15, tiny_sd15, out, "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from {out / 'checkpoints' / saved[0]} at step {step}" in resumed.stdout
    assert_same_weights(straight, out)


def test_torchrun_sigterm_then_resume(tiny_sd15: Path, latent_sd15: Path, tmp_path: Path) -> None:
    """SIGTERM to torchrun, which forwards it to both ranks' process groups: both ranks stop after the same step
    (they agree in the step's all-reduce), one checkpoint is written, and a torchrun resume ends where an
    uninterrupted 2-process run ends."""
    full, out = tmp_path / "full", tmp_path / "run"
    proc = run([*TORCHRUN, *cli(latent_sd15, tiny_sd15, full, "--max-steps", "4", "--num-workers", "0")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = [*TORCHRUN, *cli(latent_sd15, tiny_sd15, out, "--max-steps", "4", "--num-workers", "0")]
    proc = start(args, out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode != 0 and stderr.count("received SIGTERM") == 2, stderr[-3000:]
    saved = checkpoints(out)
    assert len(saved) == 1 and not saved[0].endswith(".tmp"), saved
    resumed = run([*args, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(full, out)


def test_rerun_into_a_run_directory(
    tiny_sd15: Path, latent_sd15: Path, straight: Path, tmp_path: Path
) -> None:
    """A fresh start into a directory that holds a run changes nothing and exits 2; --overwrite-output-dir
    replaces the run (new run id, its old checkpoints gone)."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    proc = run(cli(latent_sd15, tiny_sd15, out, "--checkpoint-every", "3"))
    assert proc.returncode == 2
    assert f"--output-dir {out} already holds a run" in proc.stderr and "--resume latest" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    old_id = read_json(out / "run.json")["run_id"]
    proc = run(cli(latent_sd15, tiny_sd15, out, "--checkpoint-every", "3", "--overwrite-output-dir"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    new_id = read_json(out / "run.json")["run_id"]
    assert new_id != old_id and checkpoints(out) == ["step_00000003", "step_00000006"]
    assert all(
        read_json(out / "checkpoints" / c / "state.json")["run_id"] == new_id for c in checkpoints(out)
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1])["global_step"] == 6


def test_a_second_trainer_on_the_same_directory_is_refused_and_a_second_signal_stops_at_once(
    tiny_sd15: Path, latent_sd15: Path, tmp_path: Path
) -> None:
    """Then the first trainer gets SIGTERM and, once it has said so, SIGTERM again: it ends at once by the signal
    (not exit 75 after the step), and no checkpoint is published."""
    out, said = tmp_path / "run", ""
    first = start(cli(latent_sd15, tiny_sd15, out, "--max-steps", "100000"), out)
    try:
        second = run(cli(latent_sd15, tiny_sd15, out, "--max-steps", "100000", "--resume", "latest"))
        assert second.returncode == 2
        assert f"--output-dir {out} is in use by another trainer (pid {first.pid}" in second.stderr
        first.send_signal(signal.SIGTERM)
        # the first signal is handled (its handler has restored the default action) before it says so
        said = next((line for line in first.stderr if "received SIGTERM" in line), "")
        assert "send it again to stop at once" in said
        first.send_signal(signal.SIGTERM)
    finally:
        if first.poll() is None and not said:
            first.kill()
        first.communicate(timeout=600)
    assert first.returncode == -signal.SIGTERM
    published = (
        [c for c in checkpoints(out) if not c.endswith(".tmp")] if (out / "checkpoints").is_dir() else []
    )
    assert published == []


def test_a_killed_trainers_forked_children_do_not_hold_its_lock(tmp_path: Path) -> None:
    """DataLoader workers are forked from the trainer and can outlive a kill -9 of it for a moment; the rerun must
    not find the output directory locked by them."""
    from trainer.run_dir import lock_output_dir

    holder = (
        "import os, sys, time\n"
        "from trainer.run_dir import lock_output_dir\n"
        f"lock = lock_output_dir({str(tmp_path)!r})\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(120)\n"
        "    os._exit(0)\n"
        "print(child, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]
    )
    child = int(proc.stdout.readline())
    try:
        proc.kill()
        proc.wait()
        os.kill(child, 0)  # the forked child is still alive
        lock_output_dir(tmp_path).close()
    finally:
        os.kill(child, signal.SIGKILL)
