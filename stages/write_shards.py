"""Pair samples → WebDataset tars via Ray, and the commit step that makes a chunk's tars count all at once.

Ray writes straight to final paths and object storage has no rename, so a part directory (`pairs/chunk_K/`,
`text/part_K/`) gets tars under names unique per run (`ShardNames`), each then read through to its end (a truncated
or partial tar fails here, not in the trainer), and `_part.json`, listing exactly those tars,
is written last as the part's single commit point. A directory without `_part.json` is not published; tars a
killed run left beside a `_part.json` are not listed, so nobody reads them. The manifest lists only listed tars.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
from ray.data.block import BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink, FilenameProvider
from webdataset import TarWriter

from schemas import storage
from schemas.sample import CHECKSUM, PAIR_META_EXT, TENSORS_EXT, encode_tensors, pair_key, read_tar

PART_INFO = "_part.json"  # per published directory: its tars with sample counts, plus what the stage recorded


class ShardNames(FilenameProvider):
    """`<prefix>-<attempt>-<task>.tar`. The same input gives the same names on every fresh run (Ray's write_uuid is
    random), and a resumed run gets the next attempt number (`next_attempt`): task_index restarts at 0, and
    CheckpointConfig deletes a killed task's files by name prefix, so names of two runs must never collide."""

    def __init__(self, prefix: str, attempt: int) -> None:
        self.prefix, self.attempt = prefix, attempt

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.prefix}-{self.attempt:03d}-{task_index:06d}.tar"


def next_attempt(prefix: str, names: list[str]) -> int:
    """One more than the highest attempt that ShardNames(prefix) gave any of `names` (tars and checkpoint files
    of earlier runs); 0 when none."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)-\d+\.")
    return max((int(m[1]) for n in names if (m := pattern.match(n))), default=-1) + 1


class ShardWriter(BlockBasedFileDatasink):
    """One WebDataset tar per Ray write task, byte-reproducible: Ray's write_webdataset stamps every member with
    time.time(), so this writes with webdataset's TarWriter at mtime 0 instead. Columns in `skip` (ranking_id,
    which CheckpointConfig reads from the block) stay out of the tar; every other column must hold bytes."""

    def __init__(
        self,
        path: str,
        names: ShardNames,
        rows_per_file: int,
        skip: tuple[str, ...] = (),
        filesystem: Any = None,
    ) -> None:
        super().__init__(
            path,
            filesystem=filesystem,
            file_format="tar",
            filename_provider=names,
            min_rows_per_file=rows_per_file,
        )
        self.skip = skip

    def write_block_to_file(self, block: BlockAccessor, file: Any) -> None:
        with TarWriter(file, encoder=False, mtime=0, user="data", group="data", mode=0o644) as tar:
            for row in block.iter_rows(public_row_format=False):
                tar.write({k: v for k, v in row.items() if k not in self.skip})


def to_pair_samples(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Encoder output → WebDataset columns: `__key__`, `json` (PairMeta), `safetensors` (all latent tensors).

    `ranking_id` stays in the block because CheckpointConfig reads it at the Write; ShardWriter leaves it out of
    the tar.
    """
    names = [k for k in batch if k not in ("ranking_id", PAIR_META_EXT)]
    members = [
        encode_tensors({k: _tensor(batch[k][i]) for k in names}, companion=bytes(batch[PAIR_META_EXT][i]))
        for i in range(len(batch["ranking_id"]))
    ]
    return {
        "__key__": np.asarray([pair_key(r) for r in batch["ranking_id"]], dtype=object),
        PAIR_META_EXT: batch[PAIR_META_EXT],
        TENSORS_EXT: np.asarray(members, dtype=object),
        "ranking_id": batch["ranking_id"],
    }


def _tensor(a: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.array(a))  # a copy: Ray hands out read-only views


def scan_tar(url: str, required: tuple[str, ...]) -> list[str]:
    """Read a tar to the end, front to back; returns its keys in order. Raises ValueError naming the tar and key when a sample
    lacks a member or has an unexpected one (only .json/.safetensors are allowed: nothing pickled)."""
    keys = []
    for sample in read_tar(url):
        if set(sample.spans) != set(required):
            raise ValueError(
                f"{url}: sample {sample.key} has members {sorted(sample.spans)}, expected {sorted(required)}"
            )
        keys.append(sample.key)
    return keys


def commit_part(part_dir: str, required: tuple[str, ...], info: dict[str, Any]) -> dict[str, Any]:
    """Check every tar in `part_dir`, drop empty ones, and commit the part by writing its `_part.json` last."""
    shards, keys = [], Counter()
    for name in storage.list_names(part_dir):
        if not name.endswith(".tar"):
            continue
        tar_keys = scan_tar(storage.join(part_dir, name), required)
        if not tar_keys:
            storage.remove(storage.join(part_dir, name))  # a write task that got no rows (all checkpointed)
            continue
        keys.update(tar_keys)
        shards.append({"path": name, "num_samples": len(tar_keys)})
    duplicates = [k for k, n in keys.items() if n > 1]
    if duplicates:
        raise ValueError(f"{part_dir}: {len(duplicates)} keys written twice, e.g. {duplicates[0]}")
    part = {
        **info,
        "checksum": CHECKSUM,  # every member went through encode_tensors, which records one
        "shards": shards,
        "num_samples": sum(s["num_samples"] for s in shards),
        "keys": sorted(keys),
    }
    storage.write_json(storage.join(part_dir, PART_INFO), part)
    return part


def load_part(part_dir: str) -> dict[str, Any] | None:
    """A committed part's `_part.json`, or None when the part is not committed."""
    path = storage.join(part_dir, PART_INFO)
    return storage.read_json(path) if storage.exists(path) else None
