"""Preference pairs (Pick-a-Pic parquet, hub preference parquet, WebDataset tars) → winner-first VAE latents (WebDataset tars) + caption embeddings + manifest, with Ray Data.

CLI: python -m stages.encode --src SRC --out OUT --model MODEL --resolution R [EncodeConfig flags]
     (also under `ray job submit --working-dir . -- python -m stages.encode ...`)

SRC and OUT are local paths or any fsspec URL (s3://bucket/prefix with AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
Layout of OUT (the trainer trusts only manifest.json, written last; nothing is ever renamed, as S3 has no rename):
  pairs/chunk_K/*.tar + _part.json   one directory per `chunk_files` input files; `_part.json`, written last, lists
                                     the chunk's tars and commits it (a rerun skips committed chunks)
  text/part_K/*.tar + _part.json     caption embeddings, committed the same way; a rerun only encodes new captions
  _checkpoints/chunk_K/              Ray CheckpointConfig of the chunk in flight (row-level resume after kill -9)
  _checkpoints/chunk_K.json          the files of the chunk in flight, so a rerun resumes it with the same files
  _drops/chunk_K/                    per-task records of rows dropped while decoding, merged into `_part.json`
  _encode_config.json                the config of the first run that got to work; a different config is an error
  .encode.lock                       (local OUT) held while an encode runs: a second encode on OUT exits with a message
  manifest.json, report.json

A rerun skips committed chunks; input files added to SRC since are encoded as new chunks and the manifest is
republished over all of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas import storage
from schemas.config import EncodeConfig, config_to_dict, parse_config
from schemas.errors import InputError
from schemas.manifest import MANIFEST_NAME, Manifest, Report, ShardEntry
from schemas.sample import (
    CHECKSUM,
    EMPTY_CAPTION,
    PAIR_META_EXT,
    TENSORS_EXT,
    caption_key,
    decode_tensors,
    model_family,
    read_tar,
)
from stages.decode_images import read_drops
from stages.formats import CANONICAL_SCHEMA, PairFormat, get_format
from stages.progress import RowCounter, RowProgress, count_rows
from stages.ray_driver import RayUnreachable, init_with_deadline, probe_address, start_reaper
from stages.read_pairs import Prescan, prescan
from stages.write_shards import commit_part, load_part

CONFIG_MARKER = "_encode_config.json"
LOCK_NAME = ".encode.lock"
# what the encode loads from a hub model: configs, tokenizers and safetensors weights, never the UNet
MODEL_SUBFOLDERS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
MODEL_PATTERNS = ["model_index.json"] + [
    f"{sub}/*.{ext}" for sub in MODEL_SUBFOLDERS for ext in ("json", "txt", "model", "safetensors")
]
RUNTIME_KEYS = {
    "out",
    "decode_batch_size",
    "encode_batch_size",
    "text_batch_size",
    "num_encoders",
    "ray_address",
    "verbose",
}
PAIR_MEMBERS = (PAIR_META_EXT, TENSORS_EXT)
TEXT_MEMBERS = (TENSORS_EXT,)


class ConfigMismatch(Exception):
    pass


class OutputBusy(Exception):
    """Another encode holds OUT's lock."""


def output_config(config: EncodeConfig) -> dict[str, Any]:
    """The keys that change what is written; batch sizes, actor counts and the Ray address do not."""
    return {k: v for k, v in config_to_dict(config).items() if k not in RUNTIME_KEYS}


def _normal_src(src: str) -> str:
    """`dir/`, `./dir`, `dir` and `file://dir` name one input: one spelling to compare and record."""
    return ",".join(storage.local_path(p.strip()) for p in src.split(",") if p.strip())


def _normal_model(model: str) -> str:
    """A local folder as an absolute path; a hub id (no such local path) as typed."""
    return storage.local_path(model) if Path(model).expanduser().exists() else model


def normalised(config: EncodeConfig) -> EncodeConfig:
    """Paths as compared with an earlier run and recorded in the manifest."""
    return replace(
        config,
        src=_normal_src(config.src),
        out=storage.local_path(config.out),
        model=_normal_model(config.model),
    )


def refuse_out_inside_src(config: EncodeConfig) -> None:
    """An OUT below SRC would read back its own checkpoint parquet as input after a crash."""
    out = config.out.rstrip("/")
    for part in config.src.split(","):
        root = part
        while any(c in root.rsplit("/", 1)[-1] for c in "*?[{"):
            root = root.rsplit("/", 1)[0]  # a glob's fixed leading folders
        if not storage.is_remote(root):
            root, out = str(Path(root).resolve()), str(Path(out).resolve())
        if out == root or out.startswith(root.rstrip("/") + "/"):
            raise InputError(
                f"--out {config.out} is inside --src {part}: the encode's own files would be read back as input "
                "(and a crashed run could never resume); choose an --out outside it"
            )


def resolve_model(model: str) -> str:
    """A local diffusers folder, or a hub id fetched into (or found in) the Hugging Face cache, as from_pretrained
    does; returns the folder the stages load from (on a multi-node cluster it must be on shared storage)."""
    if not Path(model).is_dir():
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        if Path(model).exists() or model.startswith(("/", ".")) or model.count("/") != 1:
            raise InputError(f"--model {model}: no such model folder (nor a hub id like owner/name)")
        try:
            model_dir = snapshot_download(model, allow_patterns=MODEL_PATTERNS, ignore_patterns=["*.fp16.*"])
        except LocalEntryNotFoundError as e:
            why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
            raise InputError(
                f"--model {model}: no local folder of that name, and not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}) while offline: {why} ({type(e).__name__}). Download it once with "
                "network access, or pass a local snapshot folder"
            ) from e
        except Exception as e:  # the hub client raises HTTP, connection and repository errors alike
            raise InputError(
                f"--model {model}: fetching it from the hub failed ({type(e).__name__}: {e})"
            ) from e
    else:
        model_dir = model
    for sub in ("vae", "text_encoder", "tokenizer"):
        if not (Path(model_dir) / sub / ("vocab.json" if sub == "tokenizer" else "config.json")).is_file():
            raise InputError(f"--model {model}: not a diffusers model folder (no {sub}/ in {model_dir})")
    return str(Path(model_dir).resolve())


@contextlib.contextmanager
def output_lock(out: str) -> Iterator[None]:
    """One encode per local OUT at a time. flock is released by the kernel however the holder dies, so a killed
    run never leaves a stale lock; an OUT this call created and left empty is removed again. Object storage has
    no locks: there the commit files keep concurrent runs correct, not exclusive."""
    if storage.is_remote(out):
        yield
        return
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise OutputBusy(
                f"{out}: another encode is writing there ({holder or 'holder unknown'}); wait for it to finish "
                "or use another --out"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # not a file its previous holder unlinked after we opened it
        os.close(fd)
    holder = f"pid {os.getpid()} on {socket.gethostname()}, since {datetime.now(UTC).isoformat(timespec='seconds')}"
    os.ftruncate(fd, 0)
    os.write(fd, holder.encode())
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)
        if created and not any(out.iterdir()):
            out.rmdir()


def previous_config(out: str) -> dict[str, Any] | None:
    """The config OUT holds pairs of: the manifest's, else the marker's once a chunk is committed or has rows
    checkpointed. Caption embeddings alone do not bind OUT: a run that failed after them (e.g. on a broken VAE)
    must not block the corrected rerun, which re-encodes them (they are few and cheap)."""
    if storage.exists(storage.join(out, MANIFEST_NAME)):
        return Manifest.load(out).encode_config
    marker = storage.join(out, CONFIG_MARKER)
    checkpoints = storage.join(out, "_checkpoints")
    checkpointed = [  # Ray creates the folder before its first commit: only one with files holds rows
        n
        for n in storage.list_names(checkpoints)
        if not n.endswith(".json") and storage.list_names(storage.join(checkpoints, n))
    ]
    pairs = published_parts(storage.join(out, "pairs"), "chunk_") or checkpointed
    return storage.read_json(marker) if pairs and storage.exists(marker) else None


def recorded_config(recorded: dict[str, Any]) -> dict[str, Any]:
    """A config OUT recorded, as this version compares it: keys this version no longer has are left out (they
    cannot change what it writes; e.g. the never-used `seed` of earlier versions), so older outputs still resume."""
    known = {f.name for f in fields(EncodeConfig)}
    return {k: v for k, v in recorded.items() if k in known}


def compare_configs(previous: dict[str, Any], current: dict[str, Any], out: str) -> None:
    keys = {k: v for k, v in recorded_config(previous).items() if k not in RUNTIME_KEYS}
    keys["src"], keys["model"] = _normal_src(keys.get("src", "")), _normal_model(keys.get("model", ""))
    differing = sorted(k for k in keys.keys() | current.keys() if keys.get(k) != current.get(k))
    if differing:
        detail = ", ".join(f"{k}: {keys.get(k)!r} → {current.get(k)!r}" for k in differing)
        raise ConfigMismatch(f"{out} was encoded with a different config ({detail}); use another --out")


# ---------------------------------------------------------------------------------------------------------------
# Ray


def init_ray(address: str | None, verbose: bool = False) -> bool:
    """Join `address` (or RAY_ADDRESS, as under `ray job submit`); otherwise start a private local cluster.

    Returns True when this process started Ray (and so shuts it down). A new local cluster gets at least 4 logical
    CPUs: on a 2-CPU machine Ray Data's Write op otherwise starves behind decode tasks. The storage settings of this
    environment (AWS_*, FSSPEC_*) go to the workers with the job, so they reach the same object store; under
    `ray job submit` the job's own runtime environment decides instead. Unless `verbose`, Ray's INFO logging, the
    workers' output and Ray Data's per-operator bars stay off the console (errors still raise here): the job's own
    progress line (stages/progress.py) reports instead.
    """
    import ray
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = verbose
    context.enable_auto_log_stats = verbose
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    # its one warning says that the bars are off, which is what quiet asks for
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if verbose else logging.ERROR)
    if ray.is_initialized():
        return False
    quiet = {} if verbose else {"logging_level": logging.WARNING, "log_to_driver": False}
    source = "--ray-address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    env = storage.storage_env()
    runtime_env = {"env_vars": env} if env and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ else None
    if address:
        probe_address(address, source)
        init_with_deadline(source, address=address, runtime_env=runtime_env, **quiet)
    else:
        start_reaper()  # stops this local cluster's processes however the driver dies, SIGKILL included
        ray.init(
            num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, runtime_env=runtime_env, **quiet
        )
    return True


def start_progress(out: str, plan: list[tuple[int, list[str]]], scan: Prescan, counter: Any) -> RowProgress:
    """The job's progress line: rows of chunks published earlier count as done; for the others, the rows the
    prescan lets through (decode drops make the real count a little lower, and the final line exact)."""
    published = expected = 0
    for k, files in plan:
        part = load_part(storage.join(out, "pairs", f"chunk_{k:05d}"))
        if part is not None:
            published += part["num_samples"]
        else:
            expected += sum(scan.per_file[f].rows for f in files) - sum(scan.dropped(files).values())
    progress = RowProgress(published + expected, done=published)
    progress.watch(counter)
    return progress


def default_pool_size(resources: dict[str, float], local_cores: int | None) -> int:
    """Encoder actors when --num-encoders is 0: one per GPU, else one per 2 CPUs (each runs two torch threads).
    `local_cores`: the cores of this machine when the cluster is the private one init_ray started, which
    advertises at least 4 CPUs however few the machine has; two 2-thread actors on 2 cores only take turns (the
    demo's 2,687 pairs: 60-63 s with two, 44-53 s with one)."""
    if resources.get("GPU"):
        return int(resources["GPU"])
    return max(1, (local_cores or int(resources.get("CPU", 2))) // 2)


def model_stage(
    config: EncodeConfig, size: int, batch_size: int, **constructor_kwargs: Any
) -> dict[str, Any]:
    """map_batches kwargs of a model actor stage (text encoder, VAE): `config`'s model and dtype, two torch threads
    per actor, a pool of `size` actors, each on a GPU where the cluster has them."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    model = {"model": str(Path(config.model).resolve()), "dtype": config.dtype, "num_threads": 2}
    return {
        "batch_size": batch_size,
        "fn_constructor_kwargs": {**model, **constructor_kwargs},
        "compute": ray.data.ActorPoolStrategy(size=size),
        **({"num_gpus": 1} if gpus else {"num_cpus": 1}),
    }


def text_job(
    config: EncodeConfig, out: str, captions: set[str], report: Callable[[str], None]
) -> Callable[[], None] | None:
    """A job that encodes the captions no published text part holds yet into one new part; None if there are none.
    Its dataset is built here, in the caller's thread, because Ray Data copies the DataContext (here: no
    checkpointing) into a dataset when it is created: the job can then run in another thread beside the pair
    chunks, whose context checkpoints."""
    import ray
    from ray.data import DataContext

    from stages.encode_text import CaptionEncoder
    from stages.write_shards import ShardNames, ShardWriter

    text_dir = storage.join(out, "text")
    parts = published_parts(text_dir, "part_")
    known = {k for p in parts for k in p["keys"]}
    todo = sorted(c for c in captions | {EMPTY_CAPTION} if caption_key(c) not in known)
    if not todo:
        return None
    k = len(parts)
    part_dir = storage.join(text_dir, f"part_{k:05d}")
    storage.remove(
        part_dir
    )  # no row-level resume for text: a killed part is redone (captions are few and cheap)
    filesystem, path = storage.arrow_filesystem(part_dir)
    ctx = DataContext.get_current()
    ctx.checkpoint_config = None
    ctx.execution_options.preserve_order = True  # reproducible tars: rows reach them in input order
    dataset = (
        ray.data.from_items([{"caption": c} for c in todo])
        .map_batches(CaptionEncoder, **model_stage(config, 1, config.text_batch_size))
        .repartition(target_num_rows_per_block=config.text_shard_size, strict=True)
    )

    def write() -> None:
        dataset.write_datasink(
            ShardWriter(path, ShardNames("text", 0), config.text_shard_size, filesystem=filesystem)
        )
        part = commit_part(part_dir, TEXT_MEMBERS, {"captions": len(todo)})
        report(f"encode: text part {k}: {part['num_samples']} caption embeddings")

    return write


def in_background(job: Callable[[], None]) -> Future:
    """`job` in a daemon thread: an encode that fails or is interrupted exits without waiting for it (an
    uncommitted text part is redone by the rerun)."""
    future: Future = Future()

    def target() -> None:
        try:
            future.set_result(job())
        except BaseException as e:  # handed to whoever waits on the future
            future.set_exception(e)

    threading.Thread(target=target, name="encode-text", daemon=True).start()
    return future


def undo_half_moved_commits(ckpt: str) -> None:
    """Ray commits a write task's checkpoint by moving `X.pending.parquet` to `X.parquet`, which on object storage
    is a copy and then a delete. A kill between the two leaves both, and Ray's restart then deletes the task's tars
    (a pending file marks them unfinished) but keeps the committed ids: those rows would be missing from OUT.
    Removing the committed twin makes the restart encode them again instead."""
    from ray.data.checkpoint.checkpoint_writer import PENDING_CHECKPOINT_SUFFIX

    pending_end = f"{PENDING_CHECKPOINT_SUFFIX}.parquet"
    names = set(storage.list_names(ckpt))
    for name in names:
        committed = name.removesuffix(pending_end) + ".parquet"
        if name.endswith(pending_end) and committed in names:
            storage.remove(storage.join(ckpt, committed))


def encode_chunk(
    config: EncodeConfig, out: str, k: int, fmt: PairFormat, files: list[str], scan: Prescan, counter: Any
) -> dict[str, Any]:
    """One Ray Data job over `files` → OUT/pairs/chunk_K, resumable row by row through CheckpointConfig."""
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    from stages.decode_images import decode_pairs
    from stages.encode_latents import LatentEncoder
    from stages.read_pairs import row_filter
    from stages.write_shards import ShardNames, ShardWriter, next_attempt, to_pair_samples

    name = f"chunk_{k:05d}"
    part_dir = storage.join(out, "pairs", name)
    ckpt = storage.join(out, "_checkpoints", name)
    drops_dir = storage.join(out, "_drops", name)
    if not storage.exists(ckpt):  # no committed rows: whatever a killed run left is unaccounted for
        storage.remove(part_dir)
        storage.remove(drops_dir)
    undo_half_moved_commits(ckpt)
    storage.write_json(ckpt + ".json", {"files": files})
    names = ShardNames(
        "pairs", next_attempt("pairs", storage.list_names(part_dir) + storage.list_names(ckpt))
    )
    ckpt_fs, ckpt_path = storage.arrow_filesystem(ckpt)
    ctx = DataContext.get_current()
    # Rows reach the tars in input order, so a fresh encode of the same input publishes the same bytes, while
    # every stage still runs its tasks in parallel (only their outputs wait for their turn).
    ctx.execution_options.preserve_order = True
    ctx.checkpoint_config = CheckpointConfig(
        id_column="ranking_id",
        checkpoint_path=ckpt_path,
        override_filesystem=ckpt_fs,
        delete_checkpoint_on_success=False,
    )
    filesystem, path = storage.arrow_filesystem(part_dir)
    (
        fmt.dataset(files)
        .filter(expr=row_filter(config.tie_policy))
        .select_columns(CANONICAL_SCHEMA.names)
        .map_batches(
            decode_pairs,
            batch_size=config.decode_batch_size,
            fn_kwargs={
                "resolution": config.resolution,
                "drops_dir": drops_dir,
                "preprocess": config.preprocess,
                "alpha": config.alpha,
            },
        )
        .map_batches(
            LatentEncoder,
            **model_stage(
                config,
                config.num_encoders,
                config.encode_batch_size,
                flip=config.flip,
                latent_mode=config.latent_mode,
            ),
        )
        .map_batches(count_rows, batch_size=None, fn_kwargs={"counter": counter})
        .map_batches(to_pair_samples, batch_size=config.shard_size)
        .repartition(target_num_rows_per_block=config.shard_size, strict=True)
        .write_datasink(
            ShardWriter(path, names, config.shard_size, skip=("ranking_id",), filesystem=filesystem)
        )
    )
    DataContext.get_current().checkpoint_config = None
    dropped = scan.dropped(files)
    dropped.update(read_drops(drops_dir).values())
    rows_read = sum(scan.per_file[f].rows for f in files)
    return commit_part(
        part_dir,
        PAIR_MEMBERS,
        {"files": files, "rows_read": rows_read, "dropped": dict(sorted(dropped.items()))},
    )


def published_parts(parent: str, prefix: str) -> list[dict[str, Any]]:
    """`_part.json` of every committed `<prefix>K` directory, in K order, each with its directory name added."""
    parts = []
    for name in storage.list_names(parent):
        part = load_part(storage.join(parent, name)) if name.startswith(prefix) else None
        if part is not None:
            parts.append({**part, "dir": name})
    return parts


# ---------------------------------------------------------------------------------------------------------------
# manifest


def _code_version() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        version = importlib.metadata.version("dpo-latents")
    except importlib.metadata.PackageNotFoundError:
        version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version  # e.g. under `ray job submit`, whose working dir has no .git
    return f"{version}+g{commit}"


def versions() -> dict[str, str]:
    libs = ("torch", "diffusers", "transformers", "ray", "webdataset", "pyarrow")
    return {"code": _code_version(), **{lib: importlib.metadata.version(lib) for lib in libs}}


def text_shapes(out: str, entry: ShardEntry) -> tuple[list[int], int | None]:
    """[77, D] and the pooled dim, read from a stored text sample rather than re-derived from model configs."""
    first = next(read_tar(storage.join(out, entry.path), read=TEXT_MEMBERS))
    tensors = decode_tensors(first.data[TENSORS_EXT], ["prompt_embeds"], first.where)
    pooled = tensors.get("pooled_prompt_embeds")
    return list(tensors["prompt_embeds"].shape), (int(pooled.shape[0]) if pooled is not None else None)


def write_manifest(config: EncodeConfig, model_dir: str, out: str, chunks: list[dict[str, Any]]) -> Manifest:
    """Publish the manifest over all `chunks`; zero pairs is an error, never an empty manifest."""
    shards = [
        ShardEntry(f"pairs/{c['dir']}/{s['path']}", s["num_samples"]) for c in chunks for s in c["shards"]
    ]
    if not shards:
        dropped = sum((Counter(c["dropped"]) for c in chunks), Counter())
        raise InputError(
            f"--src {config.src}: no trainable rows: every row was dropped ({dict(dropped)}); no manifest published"
        )
    texts = published_parts(storage.join(out, "text"), "part_")
    text_shards = [
        ShardEntry(f"text/{p['dir']}/{s['path']}", s["num_samples"]) for p in texts for s in p["shards"]
    ]
    vae = storage.read_json(str(Path(model_dir) / "vae" / "config.json"))  # not diffusers: seconds of imports
    down = 2 ** (len(vae["block_out_channels"]) - 1)
    text_shape, pooled = text_shapes(out, text_shards[0])
    manifest = Manifest(
        num_samples=sum(s.num_samples for s in shards),
        shards=shards,
        num_text_samples=sum(s.num_samples for s in text_shards),
        text_shards=text_shards,
        empty_caption_key=caption_key(EMPTY_CAPTION),
        model=config.model,
        model_family=model_family(model_dir),
        resolution=config.resolution,
        vae_scaling_factor=float(vae["scaling_factor"]),
        vae_shift_factor=vae.get("shift_factor"),
        latent_dtype="float16",
        latent_mode=config.latent_mode,
        latent_shape=[vae["latent_channels"], config.resolution // down, config.resolution // down],
        flip_variants=config.flip,
        text_embed_shape=text_shape,
        pooled_embed_dim=pooled,
        tie_policy=config.tie_policy,
        encode_config=config_to_dict(config),
        versions=versions(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        # parts published by an encode from before checksums have none; then nothing can be verified
        checksum=CHECKSUM if all(p.get("checksum") == CHECKSUM for p in [*chunks, *texts]) else None,
    )
    manifest.check(storage.join(out, MANIFEST_NAME))
    manifest.save(out)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# driver


def plan_chunks(out: str, files: list[str], scan: Prescan, chunk_files: int) -> list[tuple[int, list[str]]]:
    """(K, files) of every chunk of this OUT: committed chunks and the one a killed run left in flight keep their
    files; files that are in none of them (all of them on a first run, new ones later) form new chunks after them.
    A committed chunk whose files are gone from SRC or changed is an error: the manifest would not match SRC."""
    plan: dict[int, list[str]] = {}
    listed = set(files)
    for part in published_parts(storage.join(out, "pairs"), "chunk_"):
        k, where = int(part["dir"].removeprefix("chunk_")), storage.join(out, "pairs", part["dir"])
        gone = [f for f in part["files"] if f not in listed]
        if gone:
            raise InputError(
                f"{where} holds rows of {gone[0]}, which --src no longer lists; use another --out"
            )
        rows = sum(scan.per_file[f].rows for f in part["files"])
        if rows != part["rows_read"]:
            raise InputError(
                f"{where}: its files now hold {rows} rows, {part['rows_read']} when encoded; use another --out"
            )
        plan[k] = part["files"]
    checkpoints = storage.join(out, "_checkpoints")
    for name in storage.list_names(checkpoints):
        if not (name.startswith("chunk_") and name.endswith(".json")):
            continue
        k, in_flight = int(name[6:-5]), storage.read_json(storage.join(checkpoints, name))["files"]
        assigned = {f for fs in plan.values() for f in fs}
        if k not in plan and listed.issuperset(in_flight) and not assigned.intersection(in_flight):
            plan[k] = in_flight
        else:  # its files changed since it was killed: that chunk starts again
            storage.remove(storage.join(checkpoints, name[:-5]))
            storage.remove(storage.join(checkpoints, name))
    assigned = {f for fs in plan.values() for f in fs}
    new = [f for f in files if f not in assigned]
    first = max(plan, default=-1) + 1
    for i in range(0, len(new), chunk_files):
        plan[first + i // chunk_files] = new[i : i + chunk_files]
    return sorted(plan.items())


def run(config: EncodeConfig) -> Report | None:
    """Encode `config.src` into `config.out`; None when OUT already holds every SRC file with the same config.

    Every check that can fail on the user's input runs before anything is written, and the config marker is only
    written once Ray is up and the work is planned, so a failed first attempt never blocks a corrected rerun.
    """
    t0 = time.perf_counter()
    config = normalised(config)
    refuse_out_inside_src(config)
    model_dir = resolve_model(config.model)
    fmt = get_format(config.format, config.src, config.columns)
    files = fmt.list_inputs()
    scan = prescan(fmt, files, config.tie_policy)
    dropped = scan.dropped(files)
    if scan.rows_read - sum(dropped.values()) == 0:
        raise InputError(
            f"--src {config.src}: no trainable rows ({scan.rows_read} rows read, dropped {dict(dropped) or 0}); "
            "nothing was written"
        )
    out = config.out  # absolute: Ray workers and the checkpoint store need absolute paths
    with output_lock(out):
        previous = previous_config(out)
        marker = storage.join(out, CONFIG_MARKER)
        if previous is not None:
            compare_configs(previous, output_config(config), out)
        elif storage.exists(marker) and recorded_config(storage.read_json(marker)) != output_config(config):
            for stale in ("text", "pairs", "_checkpoints", "_drops"):  # a failed attempt with another config
                storage.remove(storage.join(out, stale))
        plan = plan_chunks(out, files, scan, config.chunk_files)
        todo = [k for k, _ in plan if load_part(storage.join(out, "pairs", f"chunk_{k:05d}")) is None]
        if not todo and storage.exists(storage.join(out, MANIFEST_NAME)):
            print(
                f"encode: {storage.join(out, MANIFEST_NAME)} already holds all {len(files)} files; nothing to do"
            )
            return None
        print(
            f"encode: {len(files)} {config.format} files, {scan.rows_read} rows, {len(scan.captions)} unique "
            f"captions, {len(todo)} of {len(plan)} chunks to encode → {out}",
            flush=True,
        )
        started_ray = init_ray(config.ray_address, config.verbose)
        progress = None
        try:
            import ray

            storage.write_json(marker, output_config(config))
            local_cores = os.cpu_count() if started_ray else None
            work = replace(
                config,
                model=model_dir,
                num_encoders=config.num_encoders or default_pool_size(ray.cluster_resources(), local_cores),
            )
            done, encoded_rows = [], 0
            counter = ray.remote(num_cpus=0)(RowCounter).remote()
            progress = start_progress(out, plan, scan, counter)
            # The captions run beside the pair chunks rather than before them: the text actor's start (imports
            # and weights) overlaps the decode (the demo's encodes: 7-12 s sooner each)
            write_text = text_job(work, out, scan.captions, progress.print)
            text_done = in_background(write_text) if write_text else None
            for k, chunk_files in plan:
                if text_done is not None and text_done.done():
                    text_done.result()  # a failed text job stops the run here, not after every chunk
                name = f"chunk_{k:05d}"
                part = load_part(storage.join(out, "pairs", name))
                if part is None:
                    tc = time.perf_counter()
                    part = encode_chunk(work, out, k, fmt, chunk_files, scan, counter)
                    encoded_rows += part["num_samples"]
                    progress.print(
                        f"encode: chunk {k}: {part['num_samples']} pairs in {len(part['shards'])} tars, dropped "
                        f"{part['dropped']} ({time.perf_counter() - tc:.1f}s)"
                    )
                else:
                    progress.print(f"encode: chunk {k} already published, skipped")
                for leftover in (f"_checkpoints/{name}", f"_checkpoints/{name}.json", f"_drops/{name}"):
                    storage.remove(
                        storage.join(out, leftover)
                    )  # a kill between commit and clean-up leaves them
                done.append({**part, "dir": name})
            if text_done is not None:
                text_done.result()
            progress.finish(counter)
            manifest = write_manifest(config, model_dir, out, done)
        finally:
            if progress is not None:
                progress.stop()
            if started_ray:
                ray.shutdown()
    return write_report(config, out, manifest, done, encoded_rows, time.perf_counter() - t0)


def write_report(
    config: EncodeConfig,
    out: str,
    manifest: Manifest,
    chunks: list[dict[str, Any]],
    encoded_rows: int,
    seconds: float,
) -> Report:
    dropped: dict[str, int] = {}
    for c in chunks:
        for reason, n in c["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    pair_bytes = sum(storage.size(storage.join(out, s.path)) for s in manifest.shards)
    images_per_row = 4 if config.flip else 2
    report = Report(
        rows_read=sum(c["rows_read"] for c in chunks),
        rows_written=manifest.num_samples,
        dropped=dict(sorted(dropped.items())),
        seconds=round(seconds, 2),
        extra={
            "rows_encoded_this_run": encoded_rows,
            "rows_per_s": round(encoded_rows / seconds, 2),
            "images_per_s": round(encoded_rows * images_per_row / seconds, 2),
            "bytes_per_pair": round(pair_bytes / max(1, manifest.num_samples)),
            "text_samples": manifest.num_text_samples,
        },
    )
    report.save(out)
    print(
        f"encode: done in {seconds:.1f}s: {report.rows_written}/{report.rows_read} rows written, "
        f"{report.extra['rows_per_s']} rows/s, {report.extra['images_per_s']} images/s (VAE inputs incl. flips), "
        f"dropped {report.dropped or 'nothing'}, {report.extra['bytes_per_pair']} bytes/pair, "
        f"{manifest.num_text_samples} caption embeddings → {storage.join(out, MANIFEST_NAME)}",
        flush=True,
    )
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_config(EncodeConfig, argv, __doc__.split("\n")[0]))
    except (InputError, ConfigMismatch, OutputBusy, RayUnreachable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("encode: interrupted; the same command resumes where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
