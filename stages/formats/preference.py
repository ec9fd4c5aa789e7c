"""`--format preference`: parquet in the hub's common preference layout (what `datasets` writes).

Columns are mapped with `--columns`: `caption=prompt,chosen=chosen,rejected=rejected` (the TRL-style default) or
`caption=…,image_0=…,image_1=…,label_0=…` (label 1 = image_0 preferred, 0.5 = tie), plus an optional `id=…`.
An image cell is raw bytes or `struct<bytes, path>`; a path with null bytes is read relative to the parquet file's
folder, or as an fsspec URL. Without an id column a row's ranking_id is `stable_id(file relative to --src, row)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.errors import InputError
from stages.formats import ID_LABEL_CAPTION, ROWS_PER_BLOCK, PairFormat, canonical_table
from stages.input_files import open_parquet, read_parquet_columns


def _image_kind(t: pa.DataType) -> str | None:
    """ "bytes", "struct" (struct<bytes, path>, either field optional) or None when the type holds no image."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytes"
    if pa.types.is_struct(t):
        names = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
        ok_bytes = (
            "bytes" not in names
            or pa.types.is_binary(names["bytes"])
            or pa.types.is_large_binary(names["bytes"])
        )
        ok_path = (
            "path" not in names
            or pa.types.is_string(names["path"])
            or pa.types.is_large_string(names["path"])
        )
        if ok_bytes and ok_path and names.keys() & {"bytes", "path"}:
            return "struct"
    return None


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


class PreferenceFormat(PairFormat):
    name = "preference"
    suffix = ".parquet"
    default_columns: ClassVar[dict[str, str]] = {
        "caption": "prompt",
        "chosen": "chosen",
        "rejected": "rejected",
    }

    @property
    def image_roles(self) -> tuple[str, str]:
        return ("image_0", "image_1") if self.labelled else ("chosen", "rejected")

    def _check_schema(self, path: str, schema: pa.Schema) -> None:
        """Every mapped column present and of a usable type; the error names the file, the column and the flag."""
        for role, column in self.columns.items():
            if column not in schema.names:
                raise InputError(
                    f"{path}: no column {column!r} for {role} (columns: {schema.names}; map it with --columns "
                    f"{role}=NAME)"
                )
            t = schema.field(column).type
            if role in self.image_roles:
                ok, want = _image_kind(t) is not None, "binary or struct<bytes, path>"
            elif role == "caption":
                ok, want = _is_text(t), "string"
            elif role == "label_0":
                ok, want = pa.types.is_integer(t) or pa.types.is_floating(t), "a number"
            else:
                ok, want = pa.types.is_integer(t), "an integer"
            if not ok:
                raise InputError(f"{path}: column {column!r} ({role}) has type {t}, expected {want}")

    def _open(self, path: str) -> tuple[pq.ParquetFile, Any]:
        pf, f = open_parquet(path)
        try:
            self._check_schema(path, pf.schema_arrow)
        except InputError:
            f.close()
            raise
        return pf, f

    def _ids(self, path: str, table: pa.Table, first_row: int) -> pa.Array:
        if "id" in self.columns:
            try:
                return pc.cast(table[self.columns["id"]], pa.int64())
            except pa.ArrowInvalid as e:
                raise InputError(
                    f"{path}: column {self.columns['id']!r} (id) does not fit int64 ({e})"
                ) from e
        return pa.array([self.stable_row_id(path, first_row + i) for i in range(len(table))], pa.int64())

    def _labels(self, table: pa.Table) -> pa.Array:
        if self.labelled:
            return pc.cast(table[self.columns["label_0"]], pa.float64())
        return pa.array([1.0] * len(table), pa.float64())

    def read_ids_labels_captions(self, path: str) -> pa.Table:
        pf, f = self._open(path)
        wanted = [self.columns[r] for r in ("caption", "label_0", "id") if r in self.columns]
        with f:
            table = read_parquet_columns(pf, path, wanted)
        caption = pc.cast(table[self.columns["caption"]], pa.string())
        return pa.table(
            {"ranking_id": self._ids(path, table, 0), "label_0": self._labels(table), "caption": caption},
            schema=ID_LABEL_CAPTION,
        )

    def read(self, path: str) -> Iterator[pa.Table]:
        pf, f = self._open(path)
        folder = path.rpartition("/")[0]
        with f:
            row = 0
            for batch in pf.iter_batches(
                batch_size=ROWS_PER_BLOCK, columns=sorted(set(self.columns.values()))
            ):
                table = pa.Table.from_batches([batch])
                ids = self._ids(path, table, row).to_pylist()
                images: dict[str, list] = {}
                for j, role in enumerate(self.image_roles):
                    cells = table[self.columns[role]].to_pylist()
                    resolved = [_image(c, folder, rid, role) for c, rid in zip(cells, ids, strict=True)]
                    images[f"jpg_{j}"] = [data for data, _ in resolved]
                    images[f"image_{j}_uid"] = [uid for _, uid in resolved]
                yield canonical_table(
                    {
                        "ranking_id": ids,
                        "caption": pc.cast(table[self.columns["caption"]], pa.string()).to_pylist(),
                        "label_0": self._labels(table).to_pylist(),
                        **images,
                    }
                )
                row += len(table)


def _image(cell: Any, folder: str, ranking_id: int, role: str) -> tuple[bytes | None, str]:
    """(image bytes or None, uid): a struct's path wins as uid; a path without bytes is read from storage; a
    missing file gives None, which the decode stage drops as a null image."""
    if not isinstance(cell, dict):
        return cell, f"{ranking_id}:{role}"
    data, path = cell.get("bytes"), cell.get("path")
    if data is None and path:
        url = path if "://" in path or path.startswith("/") else f"{folder}/{path}" if folder else path
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = None
    return data, path or f"{ranking_id}:{role}"
