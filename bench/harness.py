"""What the benchmarks share: a project CLI run with its peak memory, and encode-shaped stream data at SD1.5 size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from embedded.latent_dataset import write_latent_dataset

REPO = Path(__file__).resolve().parents[1]
SD15_LATENT = (4, 64, 64)


def resident_high_water_kib(pid: int) -> int:
    """VmHWM of a live process (0 once it is gone): the peak of its own address space since its exec. Not rusage's
    ru_maxrss, which on Linux starts from the parent's resident size at fork and keeps it across exec."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)


def run_cli(args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run a project CLI and return the JSON object on its last stdout line, plus `peak_rss_mib`: the process's own
    peak resident memory (VmHWM, read every 0.1 s while it runs; its DataLoader workers are not counted)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO, stdout=out, stderr=err, env={**os.environ, **(env or {})}
        )
        peak_kib = 0
        while not (ended := os.waitpid(proc.pid, os.WNOHANG))[0]:
            peak_kib = max(peak_kib, resident_high_water_kib(proc.pid))
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(ended[1])
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    result["peak_rss_mib"] = peak_kib / 1024
    return result


def sd15_stream_dataset(work: Path, num_pairs: int) -> Path:
    """A contract-conformant encode output at SD1.5 latent size (4×64×64 moments + flips), without a VAE."""
    out = work / f"sd15-latents-{num_pairs}"
    if not (out / "manifest.json").exists():
        write_latent_dataset(
            out,
            num_pairs=num_pairs,
            shard_size=250,
            latent_shape=SD15_LATENT,
            text_dim=768,
            num_captions=60,
            text_shard_size=64,
            resolution=512,
        )
    return out
