"""The encode CLI end to end on a real two-node Ray cluster: contract, drops, idempotence, resume, job submit."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cluster.progress import RowProgress
from cluster.ray_session import default_pool_size
from schemas.manifest import Manifest, Report
from schemas.sample import (
    CHECKSUM,
    PairMeta,
    caption_key,
    decode_tensors,
    latent_tensor_names,
    pair_key,
    read_tar,
)
from stages.encode import main
from stages.input_files import list_files

REPO = Path(__file__).resolve().parents[1]
FAST = ["--resolution", "64", "--shard-size", "16", "--num-encoders", "1", "--encode-batch-size", "16"]


def png(mode: str, size: tuple[int, int], colour: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG" if mode in ("RGBA", "P", "L") else "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy_src(synthetic_parquet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic train files + one file of crafted bad/odd rows + a README, as a hub snapshot directory."""
    src = tmp_path_factory.mktemp("messy") / "snapshot"
    shutil.copytree(synthetic_parquet / "train", src / "data")
    (src / "README.md").write_text("not parquet")
    template = pq.read_table(sorted((src / "data").glob("*.parquet"))[0]).slice(0, 1).to_pylist()[0]
    good = template["jpg_0"]
    cases = {  # ranking_id offset → (changes, expected drop reason or None when converted)
        0: ({"jpg_0": b""}, "empty_image"),
        1: ({"jpg_1": good[: len(good) // 3]}, "undecodable_image"),
        2: ({"jpg_0": b"garbage bytes"}, "undecodable_image"),
        3: ({"jpg_1": None}, "null_image"),
        4: ({"label_0": 0.7}, "bad_label"),
        5: ({"label_0": None}, "bad_label"),
        6: ({"caption": None}, "null_caption"),
        7: ({"jpg_0": png("L", (300, 200), 128)}, None),
        8: ({"jpg_0": png("CMYK", (200, 300), (0, 255, 0, 0))}, None),
        9: ({"jpg_1": png("RGBA", (256, 256), (0, 0, 0, 0))}, None),
        10: ({"jpg_0": png("RGB", (2000, 40), (200, 10, 10))}, None),
        11: ({"label_0": 0.5}, "tie"),
    }
    rows = [
        {**template, "ranking_id": 9_000_000 + i, "label_0": 1.0, **changes}
        for i, (changes, _) in cases.items()
    ]
    pq.write_table(
        pa.Table.from_pylist(rows, schema=pq.read_schema(src / "data" / os.listdir(src / "data")[0])),
        src / "data" / "zz-odd.parquet",
    )
    return src


def encode(args: list[str], cluster, cwd: Path = REPO, **kw) -> subprocess.CompletedProcess:
    env = {**cluster.env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "stages.encode", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def read_samples(out: Path) -> dict[str, dict]:
    """Every pair sample the manifest lists (every listed tar must read to its end)."""
    manifest = Manifest.load(out)
    samples: dict[str, dict] = {}
    for shard in manifest.shards:
        in_shard = list(read_tar(out / shard.path, read=("json", "safetensors")))
        assert len(in_shard) == shard.num_samples, shard
        for sample in in_shard:
            assert set(sample.spans) == {"json", "safetensors"}, sample.where  # nothing pickled
            samples[sample.key] = sample.data
    return samples


def text_keys(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    texts = {}
    for shard in Manifest.load(out).text_shards:
        for sample in read_tar(out / shard.path, read=("safetensors",)):
            assert set(sample.spans) == {"safetensors"}, sample.where
            texts[sample.key] = decode_tensors(
                sample.data["safetensors"], [], sample.where, require_checksum=True
            )
    return texts


def check_contract(
    out: Path, src_rows: dict[int, dict], family: str, mode: str, flip: bool
) -> dict[str, PairMeta]:
    manifest = Manifest.load(out)
    assert manifest.model_family == family and manifest.latent_mode == mode and manifest.flip_variants == flip
    assert manifest.checksum == CHECKSUM
    assert manifest.latent_shape == [4, 8, 8] and manifest.latent_dtype == "float16"
    assert manifest.text_embed_shape == [77, 96 if family == "sdxl" else 32]
    assert manifest.pooled_embed_dim == (32 if family == "sdxl" else None)
    texts = text_keys(out)
    assert manifest.empty_caption_key == caption_key("") and caption_key("") in texts
    metas = {}
    for key, sample in read_samples(out).items():
        meta = PairMeta.from_json_bytes(sample["json"])
        names = latent_tensor_names(mode, flip)  # the encoder's checksums verify, JSON member included
        tensors = decode_tensors(
            sample["safetensors"], names, key, companion=sample["json"], require_checksum=True
        )
        assert sorted(tensors) == sorted(latent_tensor_names(mode, flip))
        assert all(t.dtype == torch.float16 and t.shape == (4, 8, 8) for t in tensors.values())
        row = src_rows[meta.ranking_id]
        assert key == pair_key(meta.ranking_id) and meta.caption_key == caption_key(row["caption"])
        w, l = ("0", "1") if row["label_0"] >= 0.5 else ("1", "0")  # noqa: E741 - winner first; ties keep jpg_0
        assert (meta.w.uid, meta.l.uid) == (row[f"image_{w}_uid"], row[f"image_{l}_uid"])
        size_w = Image.open(io.BytesIO(row[f"jpg_{w}"])).size
        assert meta.w.original_size == (size_w[1], size_w[0])
        assert meta.caption_key in texts
        if family == "sdxl":
            assert texts[meta.caption_key]["pooled_prompt_embeds"].shape == (32,)
        metas[key] = meta
    return metas


def parquet_files(src: str) -> list[str]:
    return [f.path for f in list_files(src, ".parquet")]


def rows_of(src: Path) -> dict[int, dict]:
    return {r["ranking_id"]: r for f in parquet_files(str(src)) for r in pq.read_table(f).to_pylist()}


def small_args(synthetic_parquet: Path, out: Path, model: Path) -> list[str]:
    """The small encode several tests run: the synthetic validation split at the fast settings."""
    return ["--src", str(synthetic_parquet / "validation"), "--out", str(out), "--model", str(model), *FAST]


def messy_args(src: Path, out: Path, model: Path) -> list[str]:
    """The encode of messy_src that sd15_out publishes, in two chunks."""
    return ["--src", str(src), "--out", str(out), "--model", str(model), *FAST, "--chunk-files", "6"]


@pytest.fixture(scope="module")
def sd15_out(messy_src: Path, tiny_sd15: Path, ray_cluster, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "sd15"
    r = encode([*messy_args(messy_src, out, tiny_sd15), "--ray-address", ray_cluster.address], ray_cluster)
    assert r.returncode == 0, r.stderr[-3000:]
    (out.parent / "console.txt").write_text(r.stdout + r.stderr)
    return out


RAY_NOISE = re.compile(r"\bINFO\b|Running Dataset|Total Progress|Execution plan|Connecting to existing Ray")


def test_console_is_one_progress_line_without_ray_noise(sd15_out: Path) -> None:
    """Ray's logging, worker output and Ray Data's bars stay off by default; the job's own progress line reports
    rows done / total with rate and ETA (a log file, as here: plain lines), ending exact."""
    console = (sd15_out.parent / "console.txt").read_text()
    # the CLI's own lines only, but for the advisory Ray's C++ core prints at level E for an actor pool whose
    # constructor arguments sit in the object store (ray#53727), which no Python-side setting silences
    others = [line for line in console.splitlines() if not line.startswith("encode: ")]
    assert all("core_worker.cc" in line and "constructor arguments" in line for line in others), console
    rows = Report.load(sd15_out).rows_written
    final = rf"encode: {rows:,}/{rows:,} rows \(100\.0%\), [\d.]+ rows/s, ETA 0:00:00\n"
    assert re.search(final, console), console
    assert "\r" not in console and len(console.splitlines()) <= 12, console


def test_progress_line_in_a_terminal_and_in_a_log_file() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    log = io.StringIO()
    progress = RowProgress(total=1000, done=100, stream=log)
    start = progress.start
    for second in range(1, 61):  # 10 rows/s for a minute: a log file gets a line every 30 s
        progress.update(100 + 10 * second, now=start + second)
    progress.print("encode: chunk 0: 600 pairs")
    progress.update(700, final=True, now=start + 61)
    assert log.getvalue().splitlines() == [
        "encode: 400/1,000 rows (40.0%), 10.0 rows/s, ETA 0:01:00",
        "encode: 700/1,000 rows (70.0%), 10.0 rows/s, ETA 0:00:30",
        "encode: chunk 0: 600 pairs",
        "encode: 700/700 rows (100.0%), 9.8 rows/s, ETA 0:00:00",
    ]
    terminal = Terminal()
    progress = RowProgress(total=50, stream=terminal)
    progress.update(10, now=progress.start + 2)
    progress.update(11, now=progress.start + 2.5)  # within a second of the last: not redrawn
    progress.update(50, final=True, now=progress.start + 5)
    assert terminal.getvalue() == (
        "\r\x1b[Kencode: 10/50 rows (20.0%), 5.0 rows/s, ETA 0:00:08"
        "\r\x1b[Kencode: 50/50 rows (100.0%), 10.0 rows/s, ETA 0:00:00\n"
    )


def test_sd15_contract_drops_and_conversions(sd15_out: Path, messy_src: Path) -> None:
    rows = rows_of(messy_src)
    metas = check_contract(sd15_out, rows, "sd15", "moments", True)
    report = Report.load(sd15_out)
    ties = sum(r["label_0"] == 0.5 for r in rows.values())
    assert report.rows_read == len(rows) and report.rows_written == len(metas)
    assert report.rows_read == report.rows_written + sum(report.dropped.values())
    assert report.dropped == {
        "tie": ties,
        "bad_label": 2,
        "null_caption": 1,
        "null_image": 1,
        "empty_image": 1,
        "undecodable_image": 2,
    }
    converted = {pair_key(9_000_000 + i) for i in (7, 8, 9, 10)}  # grayscale, CMYK, alpha, extreme aspect
    assert converted <= set(metas)
    assert metas[pair_key(9_000_010)].w.original_size == (40, 2000)
    assert len(Manifest.load(sd15_out).shards) >= 2 and (sd15_out / "pairs" / "chunk_00001").is_dir()


def dataset_times(console: str) -> tuple[dict[str, float], dict[str, float], str]:
    """From Ray Data's --verbose log lines: when each dataset started and finished, and which one was the text job."""
    stamp = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"

    def times(pattern: str) -> dict[str, float]:
        found = re.findall(stamp + pattern, console)
        return {d: datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp() for t, d in found}

    text = re.search(r"Execution plan of Dataset (\S+?):.*CaptionEncoder", console)
    assert text, console
    return (
        times(r".*Starting execution of Dataset (\S+?)\."),
        times(r".*Dataset (\S+) execution finished"),
        text[1],
    )


def test_two_fresh_encodes_publish_byte_identical_shards(
    sd15_out: Path, messy_src: Path, tiny_sd15: Path, ray_cluster, tmp_path: Path
) -> None:
    """Same input and config, a second fresh encode on the same two-node cluster with --verbose: every published
    file (tar names and bytes, _part.json) is identical, and the manifests list the same shards. --verbose brings
    Ray's own console lines back and changes nothing written; by their times, the caption job was still running
    when the first pair chunk started (it runs beside the chunks, not before them). The one encoder actor reuses
    a recurring image's moments across batches: which are reused depends on the input alone."""
    out = tmp_path / "again"
    args = [*messy_args(messy_src, out, tiny_sd15), "--ray-address", ray_cluster.address, "--verbose"]
    r = encode(args, ray_cluster)
    assert r.returncode == 0, r.stderr[-3000:]
    assert RAY_NOISE.search(r.stdout + r.stderr), r.stdout + r.stderr
    started, finished, text_dataset = dataset_times(r.stdout + r.stderr)
    assert min(t for d, t in started.items() if d != text_dataset) < finished[text_dataset]

    def published(root: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(root)): p.read_bytes()
            for d in ("pairs", "text")
            for p in (root / d).rglob("*")
            if p.is_file()
        }

    first, second = published(sd15_out), published(out)
    assert sum(name.endswith(".tar") for name in first) >= 4
    assert sorted(first) == sorted(second)
    assert [n for n in first if first[n] != second[n]] == []
    a, b = Manifest.load(sd15_out), Manifest.load(out)
    assert a.shards == b.shards and a.text_shards == b.text_shards


def input_images(src: Path) -> dict[int, tuple[bytes, bytes]]:
    """ranking_id → (jpg_0, jpg_1) bytes, read from the input parquet, not through the encode."""
    return {
        int(r["ranking_id"]): (r["jpg_0"], r["jpg_1"])
        for path in sorted(src.rglob("*.parquet"))
        for r in pq.read_table(path, columns=["ranking_id", "jpg_0", "jpg_1"]).to_pylist()
    }


def distinct_images(
    out: Path, rows: dict[int, tuple[bytes, bytes]], skip: frozenset[int] = frozenset()
) -> int:
    """Σ over the published chunks of the distinct images of their pairs (by bytes), leaving out the rows `skip`."""
    distinct = 0
    for part in sorted((out / "pairs").glob("chunk_*/_part.json")):
        keys = {int(k) for k in json.loads(part.read_text())["keys"]} - skip
        distinct += len({image for key in keys for image in rows[key]})
    return distinct


def test_each_image_of_a_chunk_goes_through_the_vae_once_per_view(sd15_out: Path, messy_src: Path) -> None:
    """`vae_images` counts the VAE's work: the distinct images (by their bytes, read from the input parquet, not
    through the encode) of each chunk's published pairs, plain and flipped, far fewer than the pairs' four slots.
    Every pair holding an image stores the same bytes for it."""
    rows = input_images(messy_src)
    samples = read_samples(sd15_out)
    report = Report.load(sd15_out)
    assert report.extra["vae_images"] == 2 * distinct_images(sd15_out, rows) < 0.7 * 4 * report.rows_written
    stored: dict[str, bytes] = {}
    for sample in samples.values():
        meta = PairMeta.from_json_bytes(sample["json"])
        tensors = decode_tensors(sample["safetensors"], [], meta.caption_key)
        for side, image in (("w", meta.w), ("l", meta.l)):
            data = rows[meta.ranking_id][(0, 1)[side == "l"] ^ (meta.label_0 < 0.5)]
            value = b"".join(
                tensors[f"{side}_{p}"].numpy().tobytes() for p in ("mean", "logvar", "mean_flip")
            )
            assert stored.setdefault(data, value) == value, image.uid


def test_the_manifest_is_published_without_importing_diffusers(sd15_out: Path, tmp_path: Path) -> None:
    """The driver publishes the manifest right after the last chunk; importing diffusers there just to read the
    VAE's config.json cost seconds of CPU at the end of every encode. Republished from the same committed chunks in a
    fresh process, the manifest is the same (but for its time) and diffusers was never imported."""
    out = tmp_path / "out"
    shutil.copytree(sd15_out, out)
    before = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()
    probe = (
        "import json, sys\n"
        "from schemas.config import EncodeConfig\n"
        "from stages.output_dir import OutputDir\n"
        "from stages.publish import write_manifest\n"
        "out, config = OutputDir(sys.argv[1]), EncodeConfig(**json.loads(sys.argv[2]))\n"
        "write_manifest(config, config.model, out, out.committed_chunks())\n"
        "print('diffusers' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, str(out), json.dumps(before["encode_config"])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "False"
    after = json.loads((out / "manifest.json").read_text())
    assert {k: v for k, v in after.items() if k != "created_at"} == {
        k: v for k, v in before.items() if k != "created_at"
    }


def test_default_encoder_pool_follows_gpus_else_cores() -> None:
    """One actor per GPU, else one per 2 CPUs; the private local cluster advertises at least 4 CPUs (so that Ray
    Data's writes are not starved), but on a 2-core machine its pool is sized by the 2 real cores."""
    assert default_pool_size({"CPU": 16.0, "GPU": 2.0}, None) == 2
    assert default_pool_size({"CPU": 16.0}, None) == 8
    assert default_pool_size({"CPU": 4.0}, None) == 2
    assert default_pool_size({"CPU": 4.0}, 2) == 1
    assert default_pool_size({"CPU": 8.0, "GPU": 1.0}, 2) == 1
    assert default_pool_size({"CPU": 1.0}, None) == 1


def test_rerun_is_a_noop_and_other_config_is_an_error(
    sd15_out: Path, messy_src: Path, tiny_sd15: Path, ray_cluster
) -> None:
    before = (sd15_out / "manifest.json").read_bytes()
    args = messy_args(messy_src, sd15_out, tiny_sd15)
    r = encode([*args, "--ray-address", ray_cluster.address], ray_cluster)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    assert (sd15_out / "manifest.json").read_bytes() == before
    r = encode([*args, "--tie-policy", "keep", "--no-flip"], ray_cluster)
    assert r.returncode == 2 and "flip" in r.stderr and "tie_policy" in r.stderr


def test_sdxl_keeps_ties_and_has_pooled(
    synthetic_parquet: Path, tiny_sdxl: Path, ray_cluster, tmp_path
) -> None:
    """Also: a relative --out (as in `make encode`) resolves against the caller's working directory."""
    src = synthetic_parquet / "validation"
    r = encode(
        [
            "--src",
            str(src),
            "--out",
            "o",
            "--model",
            str(tiny_sdxl),
            *FAST,
            "--tie-policy",
            "keep",
            "--ray-address",
            ray_cluster.address,
        ],
        ray_cluster,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = rows_of(src)
    metas = check_contract(tmp_path / "o", rows, "sdxl", "moments", True)
    assert len(metas) == len(rows) and any(m.label_0 == 0.5 for m in metas.values())


def test_source_forms_list_the_same_files(messy_src: Path) -> None:
    data = messy_src / "data"
    (data / ".cache").mkdir()
    (data / ".cache" / "x.parquet").write_bytes(b"hidden, ignored")
    expected = sorted(str(p) for p in data.glob("*.parquet"))
    assert parquet_files(str(messy_src)) == expected
    assert parquet_files(str(data / "*.parquet")) == expected
    assert parquet_files(f"file://{data}") == expected
    assert parquet_files(",".join(reversed(expected))) == expected
    shutil.rmtree(data / ".cache")


@pytest.mark.parametrize("problem", ["unreadable", "missing_column"])
def test_file_level_errors_name_file_and_column(
    problem: str, synthetic_parquet: Path, tiny_sd15: Path, tmp_path: Path, capsys
) -> None:
    src = tmp_path / "src"
    shutil.copytree(synthetic_parquet / "validation", src)
    bad = src / "validation-bad.parquet"
    if problem == "unreadable":
        bad.write_bytes(b"PAR1 this is not parquet")
    else:
        pq.write_table(pq.read_table(next(src.glob("*.parquet"))).drop_columns(["label_0"]), bad)
    rc = main(["--src", str(src), "--out", str(tmp_path / "o"), "--model", str(tiny_sd15), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err
    assert ("label_0" in err) if problem == "missing_column" else ("not a readable parquet" in err)
    assert not (tmp_path / "o").exists()


def committed_ids(chunk_checkpoints: Path) -> frozenset[int]:
    """The ranking_ids of Ray's committed row checkpoints of one chunk (`X.parquet`; `X.pending.parquet` is a write
    in flight): the rows whose tar is complete."""
    return frozenset(
        int(i)
        for path in chunk_checkpoints.glob("*.parquet")
        if not path.name.endswith(".pending.parquet")
        for i in pq.read_table(path).column("ranking_id").to_pylist()
    )


def start_quiet_encode(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """The encode CLI as its own process (one thread, output discarded), for a test to kill while it runs."""
    return subprocess.Popen(
        [sys.executable, "-m", "stages.encode", *args],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_kill9_then_rerun_publishes_exactly_the_same_rows(
    sd15_out: Path, messy_src: Path, tiny_sd15: Path, ray_cluster, tmp_path: Path
) -> None:
    """Killed once chunk 0 has a committed row checkpoint but no _part.json; the rerun publishes the uninterrupted
    run's rows and resumes row by row: its VAE sees exactly the images of the rows not committed (a rerun that
    re-encoded the whole chunk would count the committed rows' images too)."""
    out = tmp_path / "o"
    args = [*messy_args(messy_src, out, tiny_sd15), "--ray-address", ray_cluster.address]
    proc = start_quiet_encode(args, ray_cluster.env)
    part, checkpoints = out / "pairs" / "chunk_00000", out / "_checkpoints" / "chunk_00000"
    try:
        while proc.poll() is None and not committed_ids(checkpoints):
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "manifest.json").exists() and not (part / "_part.json").exists()
    committed = committed_ids(checkpoints)
    r = encode(args, ray_cluster)
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = read_samples(out), read_samples(sd15_out)
    assert sorted(got) == sorted(want)
    attempts = {p.name.split("-")[1] for p in part.glob("*.tar")}
    assert "001" in attempts and attempts <= {"000", "001"}, (
        "a resumed run must not reuse the killed run's names"
    )
    assert Report.load(out).dropped == Report.load(sd15_out).dropped
    rerun = Report.load(out).extra["vae_images"]
    assert committed and rerun == 2 * distinct_images(out, input_images(messy_src), committed)


def test_ray_job_submit_on_two_nodes_mean_mode_no_flip_from_file_url_glob(
    synthetic_parquet: Path, tiny_sd15: Path, ray_cluster, tmp_path: Path
) -> None:
    """Through `ray job submit` (the job's log, what `ray job logs` shows, has the final progress line), from a
    file:// glob, storing the mean only and no flipped views, with the VAE and text encoder computing in bf16."""
    out = tmp_path / "o"
    src = f"file://{synthetic_parquet}/validation/*.parquet"
    args = [
        "--src",
        src,
        "--out",
        str(out),
        "--model",
        str(tiny_sd15),
        *FAST,
        "--latent-mode",
        "mean",
        "--no-flip",
        "--dtype",
        "bf16",
    ]
    r = subprocess.run(
        [
            str(Path(sys.executable).with_name("ray")),
            "job",
            "submit",
            "--address",
            ray_cluster.dashboard_url,
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "-m",
            "stages.encode",
            *args,
        ],
        cwd=REPO,
        env=ray_cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "succeeded" in r.stdout
    rows = Report.load(out).rows_written
    assert f"encode: {rows:,}/{rows:,} rows (100.0%)" in r.stdout, r.stdout[-3000:]
    metas = check_contract(out, rows_of(synthetic_parquet / "validation"), "sd15", "mean", False)
    assert all(m.label_0 in (0.0, 1.0) for m in metas.values())
    assert Manifest.load(out).encode_config["dtype"] == "bf16"
