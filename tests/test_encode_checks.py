"""What the encode refuses before it writes anything: a model folder without a part it loads or with a truncated
weight file, an --out it cannot write, a small `ulimit -f`, a resolution or batch that cannot fit the encoder
actors' memory; and the modes of the files the project writes. Real files, real mounts and limits; `main`
in-process where it stops before Ray, else a subprocess."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.encode import main
from tests.test_encode import REPO, small_args
from tests.test_encode_reliability import cli


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A real tmpfs at `where` (`size=…`, `ro`, …); skipped where this user may not mount."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("damage", ["truncated_vae", "no_text_encoder_weights", "unet_folder"])
def test_model_folder_checked_naming_the_part(
    damage: str, synthetic_parquet: Path, tiny_sd15: Path, tmp_path: Path, capsys
) -> None:
    """A truncated VAE weight file or a text encoder without weights (today tracebacks from inside a Ray actor),
    or one part of the pipeline passed as --model: exit 2 naming the file or part, nothing written."""
    model = tmp_path / "model"
    shutil.copytree(tiny_sd15, model)
    if damage == "truncated_vae":
        weights = next((model / "vae").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        named, arg = str(weights), model
    elif damage == "no_text_encoder_weights":
        for weights in (model / "text_encoder").glob("*.safetensors"):
            weights.unlink()
        named, arg = f"{model / 'text_encoder'} holds no weight file", model
    else:
        named, arg = "no vae/", model / "unet"
    out = tmp_path / "o"
    rc = main(small_args(synthetic_parquet, out, arg))
    err = capsys.readouterr().err
    assert rc == 2 and named in err, err
    assert "Traceback" not in err and not out.exists()


def test_read_only_out_is_refused_before_ray(
    synthetic_parquet: Path, tiny_sd15: Path, tmp_path: Path, capsys
) -> None:
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        rc = main(small_args(synthetic_parquet, ro / "o", tiny_sd15))
        err = capsys.readouterr().err
    assert rc == 2 and f"--out {ro / 'o'}" in err and "not writable" in err, err


def test_out_that_is_a_file_is_refused(
    synthetic_parquet: Path, tiny_sd15: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "o").write_text("a file")
    rc = main(small_args(synthetic_parquet, tmp_path / "o" / "sub", tiny_sd15))
    err = capsys.readouterr().err
    assert rc == 2 and "is a file, not a directory" in err, err
    assert (tmp_path / "o").read_text() == "a file"


def test_small_file_size_limit_is_named_at_once(
    synthetic_parquet: Path, tiny_sd15: Path, tmp_path: Path
) -> None:
    """`ulimit -f` of 1 MiB: today the local cluster's GCS dies writing its logs ("GCS overloaded / node timed out
    during startup"); now exit 74 naming the limit, before Ray starts and before anything is written."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    out = tmp_path / "o"
    started = time.monotonic()
    r = cli(small_args(synthetic_parquet, out, tiny_sd15), preexec_fn=limit)
    assert r.returncode == 74, r.stderr[-3000:]
    assert "the file-size limit (`ulimit -f`) is 1048576 bytes" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - started < 60 and not out.exists()


def test_resolution_that_cannot_fit_is_refused_up_front(
    synthetic_parquet: Path, tiny_sd15: Path, ray_cluster, tmp_path: Path
) -> None:
    """`--resolution 100000`: today the VAE actor runs out of memory and Ray restarts it forever; now exit 2 naming
    the flag and the memory, once Ray is up and before the config marker is written."""
    out = tmp_path / "o"
    args = [*small_args(synthetic_parquet, out, tiny_sd15), "--ray-address", ray_cluster.address]
    started = time.monotonic()
    r = cli([*args, "--resolution", "100000"], env=ray_cluster.env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--resolution 100000: the VAE encoder needs at least" in r.stderr and "above about" in r.stderr
    assert time.monotonic() - started < 120 and not out.exists()


def test_batch_that_cannot_fit_is_refused_up_front(
    synthetic_parquet: Path, tiny_sd15: Path, ray_cluster, tmp_path: Path
) -> None:
    """One image of 4096² fits (1 GiB for the tiny VAE in fp32), a call of 4096 pairs' 16384 images cannot."""
    out = tmp_path / "o"
    args = [*small_args(synthetic_parquet, out, tiny_sd15), "--ray-address", ray_cluster.address]
    r = cli([*args, "--resolution", "4096", "--encode-batch-size", "4096"], env=ray_cluster.env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--encode-batch-size 4096: a VAE call of 16384 images needs at least" in r.stderr, r.stderr[-2000:]
    assert not out.exists()


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    """The tiny models' weights were 0600 (safetensors' own mode); every file the builders write now gets the
    process umask's mode, as README says: under umask 027, 0640."""
    script = (
        "import os, sys; os.umask(0o027); from pathlib import Path; "
        "from embedded.tiny_models import build_tiny_model; from embedded.synthetic import write_synthetic_dataset; "
        "build_tiny_model('sd15', Path(sys.argv[1]) / 'tiny'); "
        "write_synthetic_dataset(Path(sys.argv[1]) / 'data', seed=0, rows=8, val_rows=4, rows_per_file=4)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, env=env, check=True, timeout=300)
    modes = {
        str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
        for p in tmp_path.rglob("*")
        if p.is_file()
    }
    assert any(name.endswith(".safetensors") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o640} == {}
