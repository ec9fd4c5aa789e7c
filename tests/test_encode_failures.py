"""What the encode does when the machine fails it or the input changes under it: a full disk is one line naming
the path and a log file (and the same command resumes once there is space), an encoder actor that keeps dying stops
the job after a bounded number of restarts with no Ray process left, and a source file fixed in place after it was
encoded is refused naming it. Real Ray clusters on 127.0.0.1, real tmpfs mounts, real signals."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.ray_session import _proc_table, descendants
from schemas.failures import EXIT_ENVIRONMENT, describe
from schemas.manifest import Manifest
from schemas.sample import caption_key
from stages.ray_driver import MAX_ACTOR_RESTARTS
from tests.test_encode import FAST, REPO, read_samples, small_args, start_quiet_encode
from tests.test_encode_checks import mounted_tmpfs
from tests.test_encode_reliability import cli

VAE_ACTOR = b"MapBatches(LatentEncoder)"


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        # exited meanwhile
        return b""


def one_line_error(stderr: str) -> str:
    """The `error:` line; no traceback and no Ray Data log record around it."""
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr[-3000:]
    (line,) = [x for x in stderr.splitlines() if x.startswith("error: ")]
    return line


def test_full_disk_while_encoding_is_one_line_and_resumes(
    synthetic_parquet: Path, tiny_sd15: Path, ray_cluster, tmp_path: Path
) -> None:
    """OUT on a 64 KiB tmpfs: the workers' tars hit ENOSPC (today a 350-line Ray traceback). Exit 74 with one line
    naming OUT, the log file holding the traceback (in the temp dir, as OUT has no room); after the mount grows,
    the same command publishes every row."""
    with mounted_tmpfs(tmp_path / "small", "size=64k") as small:
        out = small / "o"
        args = [*small_args(synthetic_parquet, out, tiny_sd15), "--ray-address", ray_cluster.address]
        r = cli(args, env=ray_cluster.env)
        assert r.returncode == EXIT_ENVIRONMENT, r.stderr[-3000:]
        line = one_line_error(r.stderr)
        assert f"no space left on the device: {out}" in line and "MiB free" in line, line
        log = Path(re.search(r"full traceback: (\S+)\)", line)[1])
        assert "No space left on device" in log.read_text()
        assert not (out / "manifest.json").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        r = cli(args, env=ray_cluster.env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert Manifest.load(out).num_samples > 0


def test_permission_and_read_only_errors_are_described(tmp_path: Path) -> None:
    """The one line names what failed and where, from the OSError a library raised (here: a read-only mount)."""
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro, pytest.raises(OSError) as caught:
        (ro / "x").write_text("x")
    assert caught.value.errno == errno.EROFS
    assert describe(caught.value, "/elsewhere") == f"read-only file system: {ro / 'x'}"
    assert describe(ValueError("a bug"), "/elsewhere") is None


def test_vae_actor_that_keeps_dying_stops_the_job(
    synthetic_parquet: Path, tiny_sd15: Path, tmp_path: Path
) -> None:
    """The encoder actor is killed (SIGKILL, as the OOM killer does) every time it comes up: today Ray restarts it
    forever; now the driver exits 74 after MAX_ACTOR_RESTARTS restarts, within minutes, naming the dead actor, and
    its local cluster's processes are gone."""
    out = tmp_path / "o"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "stages.encode", *small_args(synthetic_parquet, out, tiny_sd15)],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    started: dict[int, str] = {}
    kills, deadline = 0, time.monotonic() + 300
    try:
        while driver.poll() is None and time.monotonic() < deadline:
            started.update(descendants(driver.pid, _proc_table()))
            for pid in started:
                if VAE_ACTOR in cmdline(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        kills += 1
            time.sleep(0.2)
        assert driver.poll() is not None, f"still running after {kills} kills"
    finally:
        if driver.poll() is None:
            driver.kill()
        stderr = driver.communicate(timeout=60)[1]
    assert driver.returncode == EXIT_ENVIRONMENT, stderr[-3000:]
    assert "Ray actor" in one_line_error(stderr)
    assert MAX_ACTOR_RESTARTS < kills <= 3 * (MAX_ACTOR_RESTARTS + 1)
    time.sleep(5)
    left = [p for p, t in started.items() if _proc_table().get(p, (0, ""))[1] == t]
    assert not left, left


@pytest.mark.parametrize("change", ["fixed_caption", "touched"])
def test_source_changed_in_place_is_refused(
    change: str, synthetic_parquet: Path, tiny_sd15: Path, ray_cluster, tmp_path: Path
) -> None:
    """A finished encode, then one source parquet rewritten in place with the same name and row count (a caption
    fixed), or only its modification time changed: today "chunk 0 already published, skipped" and the fix never
    reaches OUT; now exit 2 naming the file, and OUT is left as it was."""
    src, out = tmp_path / "src", tmp_path / "o"
    shutil.copytree(synthetic_parquet / "validation", src)
    args = ["--src", str(src), "--out", str(out), "--model", str(tiny_sd15), *FAST]
    args += ["--ray-address", ray_cluster.address]
    r = cli(args, env=ray_cluster.env)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = (out / "manifest.json").read_bytes()
    first = sorted(src.glob("*.parquet"))[0]
    if change == "fixed_caption":
        fix_first_caption(first)
    else:
        os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    r = cli(args, env=ray_cluster.env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"{first} changed since {out}/pairs/chunk_00000 was encoded from it" in one_line_error(r.stderr)
    assert (out / "manifest.json").read_bytes() == manifest


def fix_first_caption(path: Path) -> str:
    """Rewrite `path` in place with its first caption changed (same name, same row count); returns the new one."""
    table = pq.read_table(path)
    captions = table["caption"].to_pylist()
    captions[0] += " (fixed)"
    pq.write_table(
        table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(captions)), path
    )
    return captions[0]


def test_chunk_in_flight_with_a_source_fixed_meanwhile_starts_again(
    synthetic_parquet: Path, tiny_sd15: Path, ray_cluster, tmp_path: Path
) -> None:
    """kill -9 once chunk 0 has rows checkpointed, then its first source fixed in place: today the rerun resumes
    and keeps the rows encoded from the old content; now chunk 0 starts again and publishes the fixed caption."""
    src, out = tmp_path / "src", tmp_path / "o"
    shutil.copytree(synthetic_parquet / "validation", src)
    args = ["--src", str(src), "--out", str(out), "--model", str(tiny_sd15), *FAST, "--shard-size", "2"]
    args += ["--ray-address", ray_cluster.address]
    proc = start_quiet_encode(args, ray_cluster.env)
    ckpt = out / "_checkpoints" / "chunk_00000"
    first = sorted(src.glob("*.parquet"))[0]
    fixed_row = pq.read_table(first, columns=["ranking_id"])["ranking_id"][0].as_py()

    def checkpointed() -> set[int]:
        # the rows Ray's checkpoint holds as written (committed files only)
        ids: set[int] = set()
        for p in ckpt.rglob("*.parquet"):
            if not p.name.endswith(".pending.parquet"):
                # removed by Ray meanwhile: the next poll sees its successor
                with contextlib.suppress(OSError):
                    ids.update(pq.read_table(p)["ranking_id"].to_pylist())
        return ids

    try:
        while proc.poll() is None and fixed_row not in checkpointed():
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    fixed = fix_first_caption(first)
    r = cli(args, env=ray_cluster.env)
    assert r.returncode == 0, r.stderr[-3000:]
    keys = {json.loads(s["json"])["caption_key"] for s in read_samples(out).values()}
    assert caption_key(fixed) in keys
