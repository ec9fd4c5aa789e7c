"""The real CLI killed with SIGKILL during training, and failing half-way through a checkpoint write, then resumed:
the final weights are bit-identical to an uninterrupted run, and torchrun with 2 CPU processes resumes the same way."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from schemas.storage import read_json
from tests.test_train import FAST
from trainer import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WDS_SECURE": "1", "PYTHONPATH": str(ROOT)}


def _args(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    """6 steps of batch 2 (test_train's fast settings) with a checkpoint every 2 steps; later flags override."""
    return [
        "-m",
        "trainer.train",
        "--data",
        str(data),
        "--model",
        str(model),
        "--output-dir",
        str(out),
        *FAST,
        "--max-steps",
        "6",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "2",
        *extra,
    ]


def _launch(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """The trainer CLI in a fresh interpreter, output captured; kwargs go to subprocess.run (timeout 600 s unless
    given)."""
    return subprocess.run(
        [sys.executable, *args], env=ENV, capture_output=True, text=True, **{"timeout": 600, **kwargs}
    )


def _run(args: list[str]) -> None:
    proc = _launch(args)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_when(args: list[str], ready: Path) -> None:
    """Start the trainer and SIGKILL it as soon as `ready` exists."""
    proc = subprocess.Popen(
        [sys.executable, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while not ready.exists():
            assert proc.poll() is None, f"trainer exited ({proc.returncode}) before {ready} appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


# run by torchrun: the keys of each rank's first 4 batches, read through the trainer's own training_batches
RANK_KEYS = """
import json, sys
from pathlib import Path
from schemas.config import TrainConfig, parse_config
from trainer.train import make_accelerator, training_batches

cfg = parse_config(TrainConfig, sys.argv[2:], "rank keys")
accelerator = make_accelerator(cfg)
batches = training_batches(cfg, accelerator, 0)
keys = [k for _, batch in zip(range(4), batches) for k in batch["keys"]]
Path(sys.argv[1], f"rank{accelerator.process_index}.json").write_text(json.dumps(keys))
"""


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "unet" / "diffusion_pytorch_model.safetensors")


def _same(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_during_training_and_torn_save(tiny_sd15: Path, latent_sd15: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    _run(_args(latent_sd15, tiny_sd15, straight, "--checkpoints-total-limit", "0"))

    # SIGKILL while training, once the step-2 checkpoint is published. --max-steps 10000 keeps the run from finishing
    # before the kill lands; the schedule is constant (no warmup), so the resume to step 6 is the same run.
    crashed = tmp_path / "crashed"
    _kill_when(
        _args(latent_sd15, tiny_sd15, crashed, "--max-steps", "10000"),
        crashed / "checkpoints" / "step_00000002" / "state.json",
    )
    _run(_args(latent_sd15, tiny_sd15, crashed, "--resume", "latest"))
    assert _same(straight, crashed)

    # A save that dies half-way: the kernel refuses to let model.safetensors of step 4 grow past half its size
    # (RLIMIT_FSIZE, 'File too large'), so the run stops inside save_checkpoint: one line, exit 74, and the
    # half-written step_00000004.tmp is removed, never published.
    torn = tmp_path / "torn"
    step2 = straight / "checkpoints" / "step_00000002"
    shutil.copytree(step2, torn / "checkpoints" / "step_00000002")
    limit = (step2 / "model.safetensors").stat().st_size // 2
    proc = _launch(
        _args(latent_sd15, tiny_sd15, torn, "--resume", "latest"),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert proc.returncode == 74 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (torn / "checkpoints" / "step_00000004").exists()
    assert not (torn / "checkpoints" / "step_00000004.tmp").exists()
    # what a SIGKILL inside that save leaves instead: a .tmp with a truncated model file; the resume ignores it
    half = torn / "checkpoints" / "step_00000004.tmp"
    shutil.copytree(step2, half)
    with open(half / "model.safetensors", "r+b") as f:
        f.truncate(limit)
    _run(_args(latent_sd15, tiny_sd15, torn, "--resume", "latest"))
    assert _same(straight, torn)
    assert not list((torn / "checkpoints").glob("*.tmp"))


def test_torchrun_two_cpu_processes(
    tiny_sd15: Path, latent_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(torchrun + _args(latent_sd15, tiny_sd15, full, "--checkpoints-total-limit", "0", "--max-steps", "4"))
    state = read_json(full / "checkpoints" / "step_00000002" / "state.json")
    assert state["world_size"] == 2 and state["micro_step"] == 2
    _run(
        torchrun
        + _args(
            latent_sd15,
            tiny_sd15,
            resumed,
            "--max-steps",
            "4",
            "--resume",
            str(full / "checkpoints" / "step_00000002"),
        )
    )
    assert _same(full, resumed)
    # the two ranks read disjoint pairs: each rank's batches as training_batches gives them under torchrun
    probe = tmp_path / "rank_keys.py"
    probe.write_text(RANK_KEYS)
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    _run(
        [
            *torchrun,
            str(probe),
            str(ranks),
            *_args(latent_sd15, tiny_sd15, tmp_path / "probe", "--max-steps", "4")[2:],
        ]
    )
    keys = [set(json.loads((ranks / f"rank{rank}.json").read_text())) for rank in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 4 * 2 and not keys[0] & keys[1]
    # resuming with another world size is refused
    try:
        assert train.main(_args(latent_sd15, tiny_sd15, full, "--resume", "latest")[2:]) == 2
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert "world_size: checkpoint 2, now 1" in capsys.readouterr().err
