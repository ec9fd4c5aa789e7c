"""Pair samples → WebDataset tars, one per Ray write task, under the names OUT's layout gives them.

Ray writes straight to final paths (object storage has no rename); stages/output_dir.py then commits a part's tars
all at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.data.block import BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink, FilenameProvider

from schemas.sample import PAIR_META_EXT, TENSORS_EXT, encode_tensors, pair_key, write_tar
from stages.output_dir import shard_name


class ShardNames(FilenameProvider):
    """`shard_name(prefix, attempt, task_index)`, not Ray's random write_uuid: the same input gives the same names
    on every fresh run. A resumed run needs the next attempt number: task_index restarts at 0, and CheckpointConfig
    deletes a killed task's files by name prefix, so names of two runs must never collide."""

    def __init__(self, prefix: str, attempt: int) -> None:
        self.prefix, self.attempt = prefix, attempt

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return shard_name(self.prefix, self.attempt, task_index)


class ShardWriter(BlockBasedFileDatasink):
    """One WebDataset tar per Ray write task, byte-reproducible: Ray's write_webdataset stamps every member with
    time.time(), so this writes through schemas' `write_tar` instead. Columns in `skip` (ranking_id, which
    CheckpointConfig reads from the block) stay out of the tar; every other column must hold bytes."""

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
        rows = block.iter_rows(public_row_format=False)
        write_tar(file, ({k: v for k, v in row.items() if k not in self.skip} for row in rows))


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

    # a copy: Ray hands out read-only views
    return torch.from_numpy(np.array(a))
