"""The encode's last step: manifest.json over every committed part (the output's single commit point), then
report.json and the closing line. No diffusers import: reading the VAE's config.json is enough, and diffusers costs
seconds of CPU at the end of every encode."""

from __future__ import annotations

import importlib.metadata
import subprocess
import tomllib
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas import storage
from schemas.config import EncodeConfig, config_to_dict
from schemas.errors import InputError
from schemas.families import FAMILIES
from schemas.manifest import Manifest, Report, ShardEntry
from schemas.sample import (
    CHECKSUM,
    EMPTY_CAPTION,
    TENSORS_EXT,
    caption_key,
    decode_tensors,
    model_family,
    read_tar,
)
from stages.output_dir import PAIRS, TEXT, TEXT_MEMBERS, OutputDir, shard_entries
from stages.progress import RunCounts


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
        # e.g. under `ray job submit`, whose working dir has no .git
        return version
    return f"{version}+g{commit}"


def versions() -> dict[str, str]:
    libs = ("torch", "diffusers", "transformers", "ray", "webdataset", "pyarrow")
    return {"code": _code_version(), **{lib: importlib.metadata.version(lib) for lib in libs}}


def text_shapes(output: OutputDir, entry: ShardEntry) -> tuple[list[int], int | None]:
    """[77, D] and the pooled dim, read from a stored text sample rather than re-derived from model configs."""
    first = next(read_tar(output.join(entry.path), read=TEXT_MEMBERS))
    tensors = decode_tensors(first.data[TENSORS_EXT], ["prompt_embeds"], first.where)
    pooled = tensors.get("pooled_prompt_embeds")
    return list(tensors["prompt_embeds"].shape), (int(pooled.shape[0]) if pooled is not None else None)


def write_manifest(
    config: EncodeConfig, model_dir: str, output: OutputDir, chunks: list[dict[str, Any]]
) -> Manifest:
    """Publish the manifest over all `chunks`; zero pairs is an error, never an empty manifest."""
    shards = shard_entries(PAIRS, chunks)
    if not shards:
        dropped = sum((Counter(c["dropped"]) for c in chunks), Counter())
        raise InputError(
            f"--src {config.src}: no trainable rows: every row was dropped ({dict(dropped)}); no manifest published"
        )
    texts = output.committed_text_parts()
    text_shards = shard_entries(TEXT, texts)
    vae = storage.read_json(str(Path(model_dir) / "vae" / "config.json"))
    down = 2 ** (len(vae["block_out_channels"]) - 1)
    text_shape, pooled = text_shapes(output, text_shards[0])
    family = FAMILIES[model_family(model_dir)]
    manifest = Manifest(
        num_samples=sum(s.num_samples for s in shards),
        shards=shards,
        num_text_samples=sum(s.num_samples for s in text_shards),
        text_shards=text_shards,
        empty_caption_key=caption_key(EMPTY_CAPTION),
        model=config.model,
        model_family=family.name,
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
        max_sequence_length=(config.max_sequence_length or family.max_sequence_length)
        if family.is_flow
        else None,
    )
    manifest.check(output.manifest)
    manifest.save(output.root)
    return manifest


def write_report(
    config: EncodeConfig,
    output: OutputDir,
    manifest: Manifest,
    chunks: list[dict[str, Any]],
    counts: RunCounts,
    seconds: float,
) -> Report:
    dropped: dict[str, int] = {}
    for c in chunks:
        for reason, n in c["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    pair_bytes = sum(storage.size(output.join(s.path)) for s in manifest.shards)
    views = 2 if config.flip else 1
    encoded_rows = counts.rows
    report = Report(
        rows_read=sum(c["rows_read"] for c in chunks),
        rows_written=manifest.num_samples,
        dropped=dict(sorted(dropped.items())),
        seconds=round(seconds, 2),
        extra={
            "rows_encoded_this_run": encoded_rows,
            "rows_per_s": round(encoded_rows / seconds, 2),
            "images_per_s": round(encoded_rows * 2 * views / seconds, 2),
            # each recurring image once per view, not once per pair slot
            "vae_images": counts.vae_images,
            "vae_images_per_pair": round(counts.vae_images / max(1, encoded_rows), 3),
            "bytes_per_pair": round(pair_bytes / max(1, manifest.num_samples)),
            "text_samples": manifest.num_text_samples,
        },
    )
    report.save(output.root)
    print(
        f"encode: done in {seconds:.1f}s: {report.rows_written}/{report.rows_read} rows written, "
        f"{report.extra['rows_per_s']} rows/s, {counts.vae_images} VAE images for {2 * views * encoded_rows} pair "
        f"slots (views included), "
        f"dropped {report.dropped or 'nothing'}, {report.extra['bytes_per_pair']} bytes/pair, "
        f"{manifest.num_text_samples} caption embeddings → {output.manifest}",
        flush=True,
    )
    return report
