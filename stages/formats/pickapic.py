"""`--format pickapic` (default): Pick-a-Pic v1/v2 parquet, whose columns already are the canonical ones."""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.errors import InputError
from stages.formats import CANONICAL_SCHEMA, ID_LABEL_CAPTION, ROWS_PER_BLOCK, PairFormat
from stages.input_files import open_parquet, read_parquet_columns


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

    def read_ids_labels_captions(self, path: str) -> pa.Table:
        pf, f = self._open(path)
        with f:
            return read_parquet_columns(pf, path, ID_LABEL_CAPTION.names)

    def read(self, path: str) -> Iterator[pa.Table]:
        pf, f = self._open(path)
        with f:
            for batch in pf.iter_batches(batch_size=ROWS_PER_BLOCK, columns=CANONICAL_SCHEMA.names):
                yield pa.Table.from_batches([batch]).select(CANONICAL_SCHEMA.names).cast(CANONICAL_SCHEMA)
