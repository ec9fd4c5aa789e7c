"""The encode's Ray Data jobs: one per pair chunk (resumable row by row), one for the captions no part holds yet.

A pair chunk reads its input files through the format's Datasource, keeps the rows the prescan counted, decodes and
crops the images, encodes them with the VAE actors and writes tars of `shard_size` pairs, checkpointing each written
row's ranking_id (Ray's CheckpointConfig), so a run killed mid-chunk resumes with the rows it had not written. The
caption job runs in a thread beside the chunks. Rows reach the tars in input order, so a fresh encode of the same
input publishes the same bytes, while every stage still runs its tasks in parallel (only their outputs wait for
their turn).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from cluster.progress import RowProgress
from schemas import storage
from schemas.config import EncodeConfig
from schemas.sample import EMPTY_CAPTION, caption_key
from stages.decode_images import read_drops
from stages.formats import CANONICAL_SCHEMA, PairFormat
from stages.output_dir import (
    CHUNK_PREFIX,
    PAIR_MEMBERS,
    PAIRS,
    TEXT,
    TEXT_MEMBERS,
    OutputDir,
    commit_part,
    next_attempt,
    part_name,
)
from stages.progress import RowCounter, RunCounts, count_rows
from stages.ray_driver import model_stage
from stages.read_pairs import Prescan


def start_progress(
    output: OutputDir, plan: list[tuple[int, list[str]]], scan: Prescan, counter: Any
) -> RowProgress:
    """The job's progress line: rows of chunks published earlier count as done; for the others, the rows the
    prescan lets through (decode drops make the real count a little lower, and the final line exact)."""
    published = expected = 0
    for k, files in plan:
        part = output.chunk_part(k)
        if part is not None:
            published += part["num_samples"]
        else:
            expected += sum(scan.per_file[f].rows for f in files) - sum(scan.dropped(files).values())
    progress = RowProgress(published + expected, done=published)
    progress.watch(counter)
    return progress


def text_job(
    config: EncodeConfig, output: OutputDir, captions: set[str], report: Callable[[str], None]
) -> Callable[[], None] | None:
    """A job that encodes the captions no published text part holds yet into one new part; None if there are none.
    Its dataset is built here, in the caller's thread, because Ray Data copies the DataContext (here: no
    checkpointing) into a dataset when it is created: the job can then run in another thread beside the pair
    chunks, whose context checkpoints."""
    import ray
    from ray.data import DataContext

    from stages.encode_text import CaptionEncoder
    from stages.write_shards import ShardNames, ShardWriter

    parts = output.committed_text_parts()
    known = {k for p in parts for k in p["keys"]}
    todo = sorted(c for c in captions | {EMPTY_CAPTION} if caption_key(c) not in known)
    if not todo:
        return None
    k = len(parts)
    part_dir = output.text_part_dir(k)
    # no row-level resume for text: a killed part is redone (captions are few and cheap)
    storage.remove(part_dir)
    filesystem, path = storage.arrow_filesystem(part_dir)
    ctx = DataContext.get_current()
    ctx.checkpoint_config = None
    # reproducible tars: rows reach them in input order
    ctx.execution_options.preserve_order = True
    dataset = (
        ray.data.from_items([{"caption": c} for c in todo])
        .map_batches(
            CaptionEncoder,
            **model_stage(config, 1, config.text_batch_size, max_sequence_length=config.max_sequence_length),
        )
        .repartition(target_num_rows_per_block=config.text_shard_size, strict=True)
    )

    def write() -> None:
        dataset.write_datasink(
            ShardWriter(path, ShardNames(TEXT, 0), config.text_shard_size, filesystem=filesystem)
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
        except BaseException as e:
            # handed to whoever waits on the future
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
    config: EncodeConfig,
    output: OutputDir,
    k: int,
    fmt: PairFormat,
    files: list[str],
    scan: Prescan,
    counter: Any,
) -> dict[str, Any]:
    """One Ray Data job over `files` → OUT/pairs/chunk_K, resumable row by row through CheckpointConfig."""
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    from stages.decode_images import decode_pairs
    from stages.encode_latents import LatentEncoder
    from stages.read_pairs import row_filter
    from stages.write_shards import ShardNames, ShardWriter, to_pair_samples

    part_dir, ckpt, drops_dir = output.chunk_dir(k), output.checkpoint_dir(k), output.drops_dir(k)
    output.start_chunk(k, files)
    undo_half_moved_commits(ckpt)
    names = ShardNames(PAIRS, next_attempt(PAIRS, storage.list_names(part_dir) + storage.list_names(ckpt)))
    ckpt_fs, ckpt_path = storage.arrow_filesystem(ckpt)
    ctx = DataContext.get_current()
    # reproducible tars: rows reach them in input order
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
                channels_last=config.vae_channels_last,
                compile=config.vae_compile,
                # a lone actor sees the batches in input order: reuse across them stays a function of the input
                reuse_across_batches=config.num_encoders == 1,
                counter=counter,
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


def encode_all(
    config: EncodeConfig, output: OutputDir, plan: list[tuple[int, list[str]]], fmt: PairFormat, scan: Prescan
) -> tuple[list[dict[str, Any]], RunCounts]:
    """Every chunk of `plan` that is not committed yet, and the new captions beside them; returns every chunk's
    `_part.json` (with its directory name) and what this run encoded."""
    import ray

    counter = ray.remote(num_cpus=0)(RowCounter).remote()
    progress = start_progress(output, plan, scan, counter)
    try:
        # beside the pair chunks rather than before them: the text actor's start (imports, weights) overlaps the
        # decode (BENCHMARKS.md, encode section)
        write_text = text_job(config, output, scan.captions, progress.print)
        text_done = in_background(write_text) if write_text else None
        done, encoded_rows = [], 0
        for k, files in plan:
            if text_done is not None and text_done.done():
                # a failed text job stops the run here, not after every chunk
                text_done.result()
            part = output.chunk_part(k)
            if part is None:
                started = time.perf_counter()
                part = encode_chunk(config, output, k, fmt, files, scan, counter)
                encoded_rows += part["num_samples"]
                progress.print(
                    f"encode: chunk {k}: {part['num_samples']} pairs in {len(part['shards'])} tars, dropped "
                    f"{part['dropped']} ({time.perf_counter() - started:.1f}s)"
                )
            else:
                progress.print(f"encode: chunk {k} already published, skipped")
            output.finish_chunk(k)
            done.append({**part, "dir": part_name(CHUNK_PREFIX, k)})
        if text_done is not None:
            text_done.result()
        progress.finish(counter)
        return done, RunCounts(encoded_rows, ray.get(counter.vae_images.remote()))
    finally:
        progress.stop()
