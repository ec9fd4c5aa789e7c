"""Preference pairs (Pick-a-Pic parquet, hub preference parquet, WebDataset tars) → winner-first VAE latents (WebDataset tars) + caption embeddings + manifest, with Ray Data.

CLI: python -m stages.encode --src SRC --out OUT --model MODEL --resolution R [EncodeConfig flags]
     (also under `ray job submit --working-dir . -- python -m stages.encode ...`)

SRC and OUT are local paths or any fsspec URL (s3://bucket/prefix with AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
Layout of OUT (the trainer trusts only manifest.json, written last; nothing is ever renamed, as S3 has no rename):
  pairs/chunk_K/*.tar + _part.json   one directory per `chunk_files` input files; `_part.json`, written last, lists
                                     the chunk's tars and commits it (a rerun skips committed chunks)
  text/part_K/*.tar + _part.json     caption embeddings, committed the same way; a rerun only encodes new captions
  _checkpoints/chunk_K/              Ray CheckpointConfig of the chunk in flight (row-level resume after kill -9)
  _drops/chunk_K/                    per-task records of rows dropped while decoding, merged into `_part.json`
  _encode_config.json                the config of the first run; a different config on the same OUT is an error
  manifest.json, report.json
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas import storage
from schemas.config import EncodeConfig, config_to_dict, parse_config
from schemas.manifest import MANIFEST_NAME, Manifest, Report, ShardEntry
from schemas.sample import CHECKSUM, EMPTY_CAPTION, LATENT_MODES, PAIR_META_EXT, TENSORS_EXT, caption_key
from stages.decode_images import read_drops
from stages.formats import PairFormat, get_format
from stages.read_pairs import REQUIRED_COLUMNS, InputError, Prescan, prescan, valid_labels
from stages.write_shards import commit_part, load_part

CONFIG_MARKER = "_encode_config.json"
RUNTIME_KEYS = {
    "out",
    "decode_batch_size",
    "encode_batch_size",
    "text_batch_size",
    "num_encoders",
    "ray_address",
}
PAIR_MEMBERS = (PAIR_META_EXT, TENSORS_EXT)
TEXT_MEMBERS = (TENSORS_EXT,)


class ConfigMismatch(Exception):
    pass


def output_config(config: EncodeConfig) -> dict[str, Any]:
    """The keys that change what is written; batch sizes, actor counts and the Ray address do not."""
    return {k: v for k, v in config_to_dict(config).items() if k not in RUNTIME_KEYS}


def check_config(config: EncodeConfig) -> None:
    if config.latent_mode not in LATENT_MODES:
        raise InputError(f"--latent-mode must be one of {LATENT_MODES}, got {config.latent_mode!r}")
    valid_labels(config.tie_policy)
    for name in (
        "resolution",
        "shard_size",
        "text_shard_size",
        "chunk_files",
        "decode_batch_size",
        "encode_batch_size",
        "text_batch_size",
    ):
        if getattr(config, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.resolution % 8:
        raise InputError(
            f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {config.resolution}"
        )
    if not (Path(config.model) / "vae").is_dir():
        raise InputError(f"{config.model}: not a diffusers model folder (no vae/ subfolder)")


def previous_config(out: str) -> dict[str, Any] | None:
    if storage.exists(storage.join(out, MANIFEST_NAME)):
        return Manifest.load(out).encode_config
    marker = storage.join(out, CONFIG_MARKER)
    return storage.read_json(marker) if storage.exists(marker) else None


def compare_configs(previous: dict[str, Any], current: dict[str, Any], out: str) -> None:
    keys = {k: v for k, v in previous.items() if k not in RUNTIME_KEYS}
    differing = sorted(k for k in keys.keys() | current.keys() if keys.get(k) != current.get(k))
    if differing:
        detail = ", ".join(f"{k}: {keys.get(k)!r} → {current.get(k)!r}" for k in differing)
        raise ConfigMismatch(f"{out} was encoded with a different config ({detail}); use another --out")


# ---------------------------------------------------------------------------------------------------------------
# Ray


def init_ray(address: str | None) -> bool:
    """Join `address` (or RAY_ADDRESS, as under `ray job submit`); otherwise start a private local cluster.

    Returns True when this process started Ray (and so shuts it down). A new local cluster gets at least 4 logical
    CPUs: on a 2-CPU machine Ray Data's Write op otherwise starves behind decode tasks. The storage settings of this
    environment (AWS_*, FSSPEC_*) go to the workers with the job, so they reach the same object store; under
    `ray job submit` the job's own runtime environment decides instead.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    env = storage.storage_env()
    runtime_env = {"env_vars": env} if env and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ else None
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, runtime_env=runtime_env)
    return True


def encoder_pool(num_encoders: int) -> dict[str, Any]:
    """map_batches kwargs for model actors: one per GPU, else one per 2 CPUs; `num_encoders` overrides."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    size = num_encoders or (gpus if gpus else max(1, int(resources.get("CPU", 2)) // 2))
    if gpus:
        return {"compute": ray.data.ActorPoolStrategy(size=size), "num_gpus": 1}
    return {"compute": ray.data.ActorPoolStrategy(size=size), "num_cpus": 1}


def encode_text(config: EncodeConfig, out: str, captions: set[str]) -> None:
    """Encode the captions no published text part holds yet, into one new part."""
    import ray
    from ray.data import DataContext

    from stages.encode_text import CaptionEncoder
    from stages.write_shards import ShardNames

    text_dir = storage.join(out, "text")
    parts = published_parts(text_dir, "part_")
    known = {k for p in parts for k in p["keys"]}
    todo = sorted(c for c in captions | {EMPTY_CAPTION} if caption_key(c) not in known)
    if not todo:
        return
    k = len(parts)
    part_dir = storage.join(text_dir, f"part_{k:05d}")
    storage.remove(
        part_dir
    )  # no row-level resume for text: a killed part is redone (captions are few and cheap)
    filesystem, path = storage.arrow_filesystem(part_dir)
    DataContext.get_current().checkpoint_config = None
    pool = encoder_pool(1)
    (
        ray.data.from_items([{"caption": c} for c in todo])
        .map_batches(
            CaptionEncoder,
            batch_size=config.text_batch_size,
            fn_constructor_kwargs={
                "model": str(Path(config.model).resolve()),
                "dtype": config.dtype,
                "num_threads": 2,
            },
            **pool,
        )
        .repartition(target_num_rows_per_block=config.text_shard_size, strict=True)
        .write_webdataset(
            path,
            filesystem=filesystem,
            min_rows_per_file=config.text_shard_size,
            filename_provider=ShardNames("text"),
            encoder=None,
        )
    )
    part = commit_part(part_dir, TEXT_MEMBERS, {"captions": len(todo)})
    print(f"encode: text part {k}: {part['num_samples']} caption embeddings", flush=True)


def encode_chunk(
    config: EncodeConfig, out: str, k: int, fmt: PairFormat, files: list[str], scan: Prescan
) -> dict[str, Any]:
    """One Ray Data job over `files` → OUT/pairs/chunk_K, resumable row by row through CheckpointConfig."""
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    from stages.decode_images import decode_pairs
    from stages.encode_latents import LatentEncoder
    from stages.read_pairs import row_filter
    from stages.write_shards import ShardNames, drop_ranking_id, to_pair_samples

    name = f"chunk_{k:05d}"
    part_dir = storage.join(out, "pairs", name)
    ckpt = storage.join(out, "_checkpoints", name)
    drops_dir = storage.join(out, "_drops", name)
    if not storage.exists(ckpt):  # no committed rows: whatever a killed run left is unaccounted for
        storage.remove(part_dir)
        storage.remove(drops_dir)
    ckpt_fs, ckpt_path = storage.arrow_filesystem(ckpt)
    DataContext.get_current().checkpoint_config = CheckpointConfig(
        id_column="ranking_id",
        checkpoint_path=ckpt_path,
        override_filesystem=ckpt_fs,
        delete_checkpoint_on_success=False,
    )
    filesystem, path = storage.arrow_filesystem(part_dir)
    (
        fmt.dataset(files)
        .filter(expr=row_filter(config.tie_policy))
        .select_columns(list(REQUIRED_COLUMNS))
        .map_batches(
            decode_pairs,
            batch_size=config.decode_batch_size,
            fn_kwargs={"resolution": config.resolution, "drops_dir": drops_dir},
        )
        .map_batches(
            LatentEncoder,
            batch_size=config.encode_batch_size,
            fn_constructor_kwargs={
                "model": str(Path(config.model).resolve()),
                "dtype": config.dtype,
                "flip": config.flip,
                "latent_mode": config.latent_mode,
                "num_threads": 2,
            },
            **encoder_pool(config.num_encoders),
        )
        .map_batches(to_pair_samples, batch_size=config.shard_size)
        .repartition(target_num_rows_per_block=config.shard_size, strict=True)
        .write_webdataset(
            path,
            filesystem=filesystem,
            min_rows_per_file=config.shard_size,
            filename_provider=ShardNames("pairs"),
            encoder=drop_ranking_id,
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
    import tarfile

    from safetensors.torch import load as load_safetensors

    with storage.open_read(storage.join(out, entry.path)) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        tensors = load_safetensors(tar.extractfile(tar.next()).read())
    pooled = tensors.get("pooled_prompt_embeds")
    return list(tensors["prompt_embeds"].shape), (int(pooled.shape[0]) if pooled is not None else None)


def write_manifest(config: EncodeConfig, out: str, chunks: list[dict[str, Any]]) -> Manifest:
    from diffusers import AutoencoderKL

    from stages.encode_text import is_sdxl

    shards = [
        ShardEntry(f"pairs/{c['dir']}/{s['path']}", s["num_samples"]) for c in chunks for s in c["shards"]
    ]
    texts = published_parts(storage.join(out, "text"), "part_")
    text_shards = [
        ShardEntry(f"text/{p['dir']}/{s['path']}", s["num_samples"]) for p in texts for s in p["shards"]
    ]
    vae = AutoencoderKL.load_config(config.model, subfolder="vae")
    down = 2 ** (len(vae["block_out_channels"]) - 1)
    text_shape, pooled = text_shapes(out, text_shards[0])
    manifest = Manifest(
        num_samples=sum(s.num_samples for s in shards),
        shards=shards,
        num_text_samples=sum(s.num_samples for s in text_shards),
        text_shards=text_shards,
        empty_caption_key=caption_key(EMPTY_CAPTION),
        model=config.model,
        model_family="sdxl" if is_sdxl(config.model) else "sd15",
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


def run(config: EncodeConfig) -> Report | None:
    """Encode `config.src` into `config.out`; None when a finished output with the same config exists."""
    t0 = time.perf_counter()
    check_config(config)
    out = storage.local_path(config.out)  # Ray workers and the checkpoint store need absolute paths
    previous = previous_config(out)
    if previous is not None:
        compare_configs(previous, output_config(config), out)
        if storage.exists(storage.join(out, MANIFEST_NAME)):
            print(f"encode: {out}/{MANIFEST_NAME} exists with the same config; nothing to do")
            return None
    fmt = get_format(config.format, config.src, config.columns)
    files = fmt.list_inputs()
    scan = prescan(fmt, files, config.tie_policy)
    chunks = [files[i : i + config.chunk_files] for i in range(0, len(files), config.chunk_files)]
    print(
        f"encode: {len(files)} {config.format} files, {scan.rows_read} rows, {len(scan.captions)} unique captions, "
        f"{len(chunks)} chunks → {out}",
        flush=True,
    )
    if not storage.is_remote(out):
        os.makedirs(out, exist_ok=True)
    storage.write_json(storage.join(out, CONFIG_MARKER), output_config(config))
    started_ray = init_ray(config.ray_address)
    try:
        encode_text(config, out, scan.captions)
        done, encoded_rows = [], 0
        for k, chunk_files in enumerate(chunks):
            name = f"chunk_{k:05d}"
            part = load_part(storage.join(out, "pairs", name))
            if part is not None and part["files"] != chunk_files:
                raise InputError(
                    f"{storage.join(out, 'pairs', name)}: encoded from other files than chunk {k} of "
                    f"{config.src} now lists"
                )
            if part is None:
                tc = time.perf_counter()
                part = encode_chunk(config, out, k, fmt, chunk_files, scan)
                encoded_rows += part["num_samples"]
                print(
                    f"encode: chunk {k + 1}/{len(chunks)}: {part['num_samples']} pairs in "
                    f"{len(part['shards'])} tars, dropped {part['dropped']} ({time.perf_counter() - tc:.1f}s)",
                    flush=True,
                )
            else:
                print(f"encode: chunk {k + 1}/{len(chunks)} already published, skipped", flush=True)
            for leftover in ("_checkpoints", "_drops"):  # a kill between commit and clean-up leaves them
                storage.remove(storage.join(out, leftover, name))
            done.append({**part, "dir": name})
        manifest = write_manifest(config, out, done)
    finally:
        if started_ray:
            import ray

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
    config = parse_config(EncodeConfig, argv, __doc__.split("\n")[0])
    missing = [
        f.name
        for f in fields(EncodeConfig)
        if f.name in ("src", "out", "model") and not getattr(config, f.name)
    ]
    if missing:
        print(f"error: missing required flags {['--' + m for m in missing]}", file=sys.stderr)
        return 2
    try:
        run(config)
    except (InputError, ConfigMismatch, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
