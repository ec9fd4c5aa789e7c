"""`--format pickapic` (default): Pick-a-Pic v1/v2 parquet, whose columns already are the canonical ones."""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from stages.formats import CANONICAL_SCHEMA, ROWS_PER_BLOCK, PairFormat
from stages.read_pairs import InputError

SCAN_COLUMNS = ["ranking_id", "label_0", "caption"]


def open_parquet(path: str) -> tuple[pq.ParquetFile, fsspec.core.OpenFile]:
    """(ParquetFile, the open file to close); an unreadable file is an InputError naming it."""
    f = fsspec.open(path, "rb").open()
    try:
        return pq.ParquetFile(f), f
    except Exception as e:  # pyarrow/fsspec raise many types for corrupt or unreadable files
        f.close()
        raise InputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e


class PickapicFormat(PairFormat):
    name = "pickapic"
    suffix = ".parquet"

    def _open(self, path: str) -> tuple[pq.ParquetFile, fsspec.core.OpenFile]:
        pf, f = open_parquet(path)
        missing = [c for c in CANONICAL_SCHEMA.names if c not in pf.schema_arrow.names]
        if missing:
            f.close()
            raise InputError(f"{path}: missing required column {missing[0]!r} (missing: {missing})")
        return pf, f

    def scan(self, path: str) -> pa.Table:
        pf, f = self._open(path)
        with f:
            try:
                return pf.read(columns=SCAN_COLUMNS)
            except Exception as e:
                raise InputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e

    def read(self, path: str) -> Iterator[pa.Table]:
        pf, f = self._open(path)
        with f:
            for batch in pf.iter_batches(batch_size=ROWS_PER_BLOCK, columns=CANONICAL_SCHEMA.names):
                yield pa.Table.from_batches([batch]).select(CANONICAL_SCHEMA.names).cast(CANONICAL_SCHEMA)
