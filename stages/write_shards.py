"""Pair samples → WebDataset tars via Ray, and the commit step that makes a chunk's tars count all at once.

Ray's `write_webdataset` writes straight to final paths and object storage has no rename, so a part directory
(`pairs/chunk_K/`, `text/part_K/`) gets tars under unique names (Ray's write_uuid), each then read through to
its end (a truncated or partial tar fails here, not in the trainer), and `_part.json`, listing exactly those tars,
is written last as the part's single commit point. A directory without `_part.json` is not published; tars a
killed run left beside a `_part.json` are not listed, so nobody reads them. The manifest lists only listed tars.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from ray.data.datasource import FilenameProvider

from schemas import storage
from schemas.sample import CHECKSUM, PAIR_META_EXT, TENSORS_EXT, encode_tensors, pair_key, read_tar

PART_INFO = "_part.json"  # per published directory: its tars with sample counts, plus what the stage recorded


class ShardNames(FilenameProvider):
    """`<prefix>-<write_uuid>-<task>.tar`: keeps write_uuid, which CheckpointConfig matches files by and which makes
    names from different runs (task_index restarts at 0) never collide."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.prefix}-{write_uuid}-{task_index:06d}.tar"


def to_pair_samples(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Encoder output → WebDataset columns: `__key__`, `json` (PairMeta), `safetensors` (all latent tensors).

    `ranking_id` stays in the block because CheckpointConfig reads it at the Write; `drop_ranking_id` removes it
    from the tar.
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


def drop_ranking_id(sample: dict[str, Any]) -> dict[str, Any]:
    """write_webdataset encoder: the id is already in the key and the json; members stay raw bytes."""
    return {k: v for k, v in sample.items() if k != "ranking_id"}


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
