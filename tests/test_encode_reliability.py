"""What the encode does when the user gets something wrong or stops it: bad inputs exit 2 before anything is
written, reruns pick up new files, a second encode on the same OUT is refused, and signals leave no Ray behind.
Through the real CLI: its `main` in-process where it stops before Ray, else in subprocesses with real signals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.ray_session import _proc_table, descendants
from schemas.manifest import Manifest
from stages.encode import main
from stages.formats import CANONICAL_SCHEMA, get_format
from stages.output_dir import OutputDir
from stages.read_pairs import prescan
from tests.fixtures.ray_cluster import free_port
from tests.test_encode import FAST, REPO, small_args


def cli(args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "stages.encode", *args],
        cwd=REPO,
        env={**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def with_column(src: Path, dst: Path, name: str, values: pa.Array) -> None:
    table = pq.read_table(src)
    pq.write_table(table.set_column(table.schema.get_field_index(name), name, values), dst)


def bad_src(kind: str, synthetic_parquet: Path, root: Path) -> tuple[Path, str]:
    """An input directory with one problem, and what the error must name."""
    src = root / "src"
    shutil.copytree(synthetic_parquet / "validation", src)
    first = sorted(src.glob("*.parquet"))[0]
    table = pq.read_table(first)
    if kind == "all_ties":
        for f in src.glob("*.parquet"):
            with_column(f, f, "label_0", pa.array([0.5] * pq.read_metadata(f).num_rows))
        return src, "no trainable rows"
    if kind == "word_label":
        with_column(first, first, "label_0", pa.array(["left"] * len(table)))
        return src, f"{first}: column 'label_0' is not numeric (string)"
    raise AssertionError(kind)


@pytest.mark.parametrize("label_type", [pa.string(), pa.int64()], ids=["numeric-strings", "integers"])
def test_other_column_types_are_cast(
    synthetic_parquet: Path, tmp_path: Path, label_type: pa.DataType
) -> None:
    """Labels stored as numeric strings or integers and a dictionary-encoded caption (a pandas category) reach the
    stages in the canonical types: what each Ray read task yields is `fmt.read`, checked here. Ties are left out,
    so every label is a whole number an int64 column stores as it is."""
    src = sorted((synthetic_parquet / "validation").glob("*.parquet"))[0]
    table = pq.read_table(src)
    table = table.filter(pc.not_equal(table["label_0"], 0.5))
    odd = tmp_path / "odd.parquet"
    labels = pc.cast(table["label_0"], label_type)
    pq.write_table(
        table.set_column(table.schema.get_field_index("label_0"), "label_0", labels).set_column(
            table.schema.get_field_index("caption"), "caption", pc.dictionary_encode(table["caption"])
        ),
        odd,
    )
    assert pq.read_schema(odd).field("label_0").type == label_type
    fmt = get_format("pickapic", str(tmp_path))
    files = fmt.list_inputs()
    assert prescan(fmt, files, "drop").per_file[str(odd)].rows == len(table)
    read = pa.concat_tables(fmt.read(str(odd)))
    assert read.schema == CANONICAL_SCHEMA
    assert read["label_0"].to_pylist() == table["label_0"].to_pylist()
    assert read["caption"].to_pylist() == table["caption"].to_pylist()


@pytest.mark.parametrize("kind", ["all_ties", "word_label"])
def test_unusable_input_exits_2_before_writing(
    kind: str, synthetic_parquet: Path, tiny_sd15: Path, tmp_path: Path, capsys
) -> None:
    src, expected = bad_src(kind, synthetic_parquet, tmp_path)
    rc = main(["--src", str(src), "--out", str(tmp_path / "o"), "--model", str(tiny_sd15), *FAST])
    assert rc == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["src_protocol", "src_braces", "out_protocol", "damaged_manifest"])
def test_unusable_paths_exit_2_naming_them(
    kind: str, synthetic_parquet: Path, tiny_sd15: Path, tmp_path: Path, capsys
) -> None:
    """An unknown filesystem, an unbalanced brace pattern or a damaged manifest in OUT is the user's to fix: exit 2
    with the path in the message, not a traceback."""
    src, out = str(synthetic_parquet / "validation"), str(tmp_path / "o")
    if kind == "src_protocol":
        src, named = "nofs://bucket/pairs", "nofs://bucket/pairs"
    elif kind == "src_braces":
        src = named = f"{src}/validation-{{000..001.parquet"
    elif kind == "out_protocol":
        out = named = "nofs://bucket/out"
    else:
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / "manifest.json").write_text('{"num_samples": ')
        named = f"{out}/manifest.json: not readable as JSON"
    rc = main(["--src", src, "--out", out, "--model", str(tiny_sd15), *FAST])
    assert rc == 2 and named in capsys.readouterr().err


def test_an_internal_error_is_not_reported_as_the_users(
    synthetic_parquet: Path, tiny_sd15: Path, tmp_path: Path, monkeypatch
) -> None:
    """main turns InputErrors into exit 2; any other error, a ValueError included, is a bug and keeps its
    traceback."""

    def broken_plan(*args: object) -> None:
        raise ValueError("a bug in the planner")

    monkeypatch.setattr(OutputDir, "plan_chunks", broken_plan)
    with pytest.raises(ValueError, match="a bug in the planner"):
        main(small_args(synthetic_parquet, tmp_path / "o", tiny_sd15))


def test_out_inside_src_is_refused(synthetic_parquet: Path, tiny_sd15: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    shutil.copytree(synthetic_parquet / "validation", src)
    rc = main(["--src", f"{src}/", "--out", str(src / "encoded"), "--model", str(tiny_sd15), *FAST])
    assert rc == 2 and f"--out {src / 'encoded'} is inside --src {src}" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == sorted(
        p.name for p in (synthetic_parquet / "validation").iterdir()
    )


@pytest.mark.parametrize("how", ["flag", "env"])
def test_dead_ray_address_fails_fast(
    how: str, synthetic_parquet: Path, tiny_sd15: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """`ray.init` would retry a dead head forever; the probe refuses it at once, before anything is written."""
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    args = [
        "--src",
        str(synthetic_parquet / "validation"),
        "--out",
        str(tmp_path / "o"),
        "--model",
        str(tiny_sd15),
    ]
    if how == "flag":
        args += ["--ray-address", dead]
    else:
        monkeypatch.setenv("RAY_ADDRESS", dead)
    name = "--ray-address" if how == "flag" else "RAY_ADDRESS"
    assert main([*args, *FAST]) == 2
    assert f"{name} {dead}: no Ray cluster answers there" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def hub_cache(model: Path, root: Path, repo_id: str) -> Path:
    """`model` laid out as huggingface_hub caches a download of `repo_id` (refs/main → snapshots/<commit>)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def test_hub_id_that_cannot_be_fetched_says_why(synthetic_parquet: Path, tmp_path: Path) -> None:
    args = ["--src", str(synthetic_parquet / "validation"), "--out", str(tmp_path / "o"), *FAST]
    cache = {"HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    r = cli([*args, "--model", "nobody/no-model"], env=cache)
    assert r.returncode == 2 and "--model nobody/no-model" in r.stderr and "HF_HUB_OFFLINE is set" in r.stderr
    closed = {**cache, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    r = cli([*args, "--model", "nobody/no-model"], env=closed)
    assert r.returncode == 2 and "the hub could not be reached" in r.stderr, r.stderr[-2000:]
    r = cli([*args, "--model", str(tmp_path / "no-such-folder")], env=cache)
    assert r.returncode == 2 and "the local folder does not exist" in r.stderr
    assert not (tmp_path / "o").exists()


def broken_vae_copy(model: Path, root: Path) -> Path:
    """`model` with VAE weights that only fail once loaded (inside Ray, after the caption job has started): a whole
    safetensors file, so the encode's up-front check of the weight files passes, whose tensors have the wrong shapes
    for vae/config.json."""
    broken = root / "broken"
    shutil.copytree(model, broken)
    for weights in (broken / "vae").glob("*.safetensors"):
        save_file({name: torch.zeros(1) for name in load_file(weights)}, weights)
    return broken


def test_failed_first_run_then_reruns_concurrency_new_files_and_hub_id(
    synthetic_parquet: Path, tiny_sd15: Path, ray_cluster, tmp_path: Path
) -> None:
    """A VAE that only fails once loaded (inside Ray) fails the first run after it got to work; the rerun with the
    right model (a hub id in the HF cache) is not refused as a "different config", and a second encode on the same
    OUT meanwhile is; `--src dir/` then has nothing to do; a new file (sorting first) becomes a new chunk; a removed
    file, or one whose row count changed, is an error."""
    src, out = tmp_path / "src", tmp_path / "o"
    shutil.copytree(synthetic_parquet / "validation", src)
    env = {**ray_cluster.env, "HF_HUB_CACHE": str(hub_cache(tiny_sd15, tmp_path / "hub", "tiny/sd15"))}
    common = ["--src", str(src), "--out", str(out), *FAST, "--chunk-files", "2"]
    common += ["--ray-address", ray_cluster.address]
    r = cli([*common, "--model", str(broken_vae_copy(tiny_sd15, tmp_path))], env=ray_cluster.env)
    # work had started (the config marker is written), but no pair was committed
    assert r.returncode != 0 and not (out / "manifest.json").exists()
    assert (out / "_encode_config.json").exists() and not list((out / "pairs").glob("*/_part.json"))

    args = [*common, "--model", "tiny/sd15"]
    first = subprocess.Popen(
        [sys.executable, "-m", "stages.encode", *args],
        cwd=REPO,
        env={**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # the failed run left its lock file behind (unlocked): wait until the lock names this run's pid
    lock = out / ".encode.lock"
    while first.poll() is None and f"pid {first.pid} " not in (lock.read_text() if lock.exists() else ""):
        time.sleep(0.05)
    second = cli(args, env=env)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode == 2 and "another encode is writing there" in second.stderr, second.stderr[
        -2000:
    ]
    assert f"pid {first.pid}" in second.stderr
    manifest = Manifest.load(out)
    assert manifest.model == "tiny/sd15" and len({s.path.split("/")[1] for s in manifest.shards}) == 2
    chunk0 = (out / "pairs" / "chunk_00000" / "_part.json").read_bytes()

    trailing = [a if a != str(src) else f"{src}/" for a in args]
    r = cli(trailing, env=env)
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr[-2000:]

    shutil.copy(sorted((synthetic_parquet / "train").glob("*.parquet"))[0], src / "a-new.parquet")
    r = cli(args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    grown = Manifest.load(out)
    new_chunk = out / "pairs" / "chunk_00002"
    assert (out / "pairs" / "chunk_00000" / "_part.json").read_bytes() == chunk0  # untouched
    assert "a-new.parquet" in (new_chunk / "_part.json").read_text()
    assert grown.num_samples == manifest.num_samples + sum(
        s.num_samples for s in grown.shards if s.path.startswith("pairs/chunk_00002/")
    )
    assert grown.num_samples > manifest.num_samples

    new_file = src / "a-new.parquet"
    full = pq.read_table(new_file)
    pq.write_table(full.slice(0, len(full) - 1), new_file)
    r = cli(args, env=env)
    changed = f"chunk_00002: its files now hold {len(full) - 1} rows, {len(full)} when encoded"
    assert r.returncode == 2 and changed in r.stderr, r.stderr[-2000:]
    assert Manifest.load(out) == grown

    new_file.unlink()
    r = cli(args, env=env)
    assert r.returncode == 2 and "a-new.parquet, which --src no longer lists" in r.stderr, r.stderr[-2000:]
    assert Manifest.load(out) == grown


def test_every_row_dropped_while_decoding_publishes_no_manifest(
    synthetic_parquet: Path, tiny_sd15: Path, ray_cluster, tmp_path: Path
) -> None:
    """Rows the prescan accepts (numeric labels, captions, non-empty image bytes) whose jpg_0 does not decode: every
    row is dropped inside Ray, and the encode exits 2 naming --src and the drops instead of publishing an empty
    manifest."""
    src, out = tmp_path / "src", tmp_path / "o"
    src.mkdir()
    first = sorted((synthetic_parquet / "validation").glob("*.parquet"))[0]
    rows = pq.read_metadata(first).num_rows
    with_column(first, src / first.name, "jpg_0", pa.array([b"not an image"] * rows, pa.binary()))
    args = ["--src", str(src), "--out", str(out), "--model", str(tiny_sd15), *FAST]
    r = cli([*args, "--ray-address", ray_cluster.address], env=ray_cluster.env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"error: --src {src}: no trainable rows: every row was dropped" in r.stderr
    assert "'undecodable_image'" in r.stderr and not (out / "manifest.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_leaves_no_ray_processes(
    sig: int, synthetic_parquet: Path, tiny_sd15: Path, tmp_path: Path
) -> None:
    """The driver starts its own local Ray (no address given); however it is stopped, nothing of it remains."""
    out = tmp_path / "o"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stages.encode",
            *small_args(synthetic_parquet, out, tiny_sd15),
        ],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "stderr").open("w"),
    )
    started: dict[int, str] = {}
    try:  # the marker is written once ray.init has returned: the local cluster is up
        while driver.poll() is None and not (out / "_encode_config.json").exists():
            started.update(descendants(driver.pid, _proc_table()))
            time.sleep(0.1)
        started.update(descendants(driver.pid, _proc_table()))
        assert driver.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        os.kill(driver.pid, sig)
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert len(started) >= 4  # gcs, raylet, agents, reaper: a real local cluster was up
    deadline = time.monotonic() + 30
    while (left := [p for p, t in started.items() if _proc_table().get(p, (0, ""))[1] == t]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert not left, {p: (Path(f"/proc/{p}/cmdline").read_bytes()[:80]) for p in left}
