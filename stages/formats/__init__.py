"""Input formats: each turns its files into the same canonical pair rows the decode → encode → write stages take.

A format is one small class (one module each) with three duties:
  `list_inputs()`  the sorted input files under `--src` (the unit of chunking and of skipping on rerun);
  `read_ids_labels_captions(path)`  the cheap columns `ranking_id`, `label_0`, `caption` of one file, for the
                   driver's prescan (drops, row counts, unique captions, duplicate ids); a file that does not fit the
                   format raises InputError naming the file and the column or member, before any Ray work;
  `read(path)`     the file's rows as Arrow tables in `CANONICAL_SCHEMA`, run inside Ray read tasks.
`dataset(files)` wraps `read` as a Ray Datasource with one read task per file, so CheckpointConfig (which needs a
Read op and the `ranking_id` column straight after it) gives row-level kill -9 resume for every format alike.
"""

from __future__ import annotations

import functools
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from schemas.errors import InputError
from stages.input_files import list_files

CANONICAL_SCHEMA = pa.schema(
    [
        ("ranking_id", pa.int64()),
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
    ]
)
# what every format's read_ids_labels_captions returns, for the prescan
ID_LABEL_CAPTION = pa.schema([CANONICAL_SCHEMA.field(name) for name in ("ranking_id", "label_0", "caption")])
ROLES = ("caption", "chosen", "rejected", "image_0", "image_1", "label_0", "id")
# label implied: the first image is preferred
PAIR_ROLES = ("chosen", "rejected")
# Pick-a-Pic style: label 1 = image_0 preferred, 0.5 = tie
LABELLED_ROLES = ("image_0", "image_1", "label_0")
ROWS_PER_BLOCK = 256


def stable_id(*parts: str | int) -> int:
    """A 63-bit id from e.g. (file relative to --src, row index): the same input always gets the same id, so
    the chunk checkpoints, rerun skipping and `pair_key` behave as with Pick-a-Pic's own ranking_id."""
    digest = hashlib.blake2b("\0".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def parse_columns(spec: str, defaults: dict[str, str]) -> dict[str, str]:
    """`--columns caption=prompt,chosen=win,...` over the format's defaults → {role: name in the input}.

    Naming any of image_0/image_1/label_0 switches to the labelled layout (and drops the chosen/rejected defaults),
    naming chosen/rejected the other way round; a layout must be complete.
    """
    given: dict[str, str] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        role, sep, name = item.partition("=")
        role, name = role.strip(), name.strip()
        if not sep or not name or role not in ROLES:
            raise InputError(f"--columns: {item!r} is not ROLE=NAME with ROLE one of {ROLES}")
        given[role] = name
    columns = dict(defaults)
    if any(r in given for r in LABELLED_ROLES):
        columns = {r: n for r, n in columns.items() if r not in PAIR_ROLES}
    elif any(r in given for r in PAIR_ROLES):
        columns = {r: n for r, n in columns.items() if r not in LABELLED_ROLES}
    columns.update(given)
    if any(r in columns for r in PAIR_ROLES) and any(r in columns for r in LABELLED_ROLES):
        raise InputError("--columns: give either chosen/rejected or image_0/image_1/label_0, not both")
    layout = PAIR_ROLES if "chosen" in columns or "rejected" in columns else LABELLED_ROLES
    missing = [r for r in ("caption", *layout) if r not in columns]
    if missing:
        raise InputError(f"--columns: no column given for {missing} (have {columns})")
    return columns


def canonical_table(rows: dict[str, list[Any]]) -> pa.Table:
    return pa.Table.from_pydict(rows, schema=CANONICAL_SCHEMA)


class PairFormat(ABC):
    """One input layout; see the module docstring. Instances are pickled into Ray read tasks."""

    name: ClassVar[str]
    # input files end with this
    suffix: ClassVar[str]
    default_columns: ClassVar[dict[str, str]] = {}

    def __init__(self, src: str, columns: str = "") -> None:
        self.src = src
        self.columns = parse_columns(columns, self.default_columns) if self.default_columns else {}
        self.relative: dict[str, str] = {}

    @property
    def labelled(self) -> bool:
        return "label_0" in self.columns

    def list_inputs(self) -> list[str]:
        found = list_files(self.src, self.suffix)
        self.relative = {f.path: f.relative for f in found}
        return [f.path for f in found]

    def stable_row_id(self, path: str, *where: str | int) -> int:
        return stable_id(self.relative.get(path, path), *where)

    @abstractmethod
    def read_ids_labels_captions(self, path: str) -> pa.Table:
        """`ranking_id` (int64), `label_0` (numeric or null), `caption` (string or null) of every row of `path`."""

    @abstractmethod
    def read(self, path: str) -> Iterator[pa.Table]:
        """Every row of `path`, in CANONICAL_SCHEMA, a block of at most ROWS_PER_BLOCK rows at a time."""

    def dataset(self, files: list[str]) -> ray.data.Dataset:
        return ray.data.read_datasource(PairDatasource(self, files), override_num_blocks=len(files))


class PairDatasource(Datasource):
    """One Ray read task per input file, each running the format's `read`."""

    def __init__(self, fmt: PairFormat, files: list[str]) -> None:
        super().__init__()
        self.fmt = fmt
        self.files = files

    def get_name(self) -> str:
        return f"Read{self.fmt.name.capitalize()}"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(self.fmt.read, f),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[f]),
                CANONICAL_SCHEMA,
            )
            for f in self.files
        ]


def get_format(name: str, src: str, columns: str = "") -> PairFormat:
    from stages.formats.pickapic import PickapicFormat
    from stages.formats.preference import PreferenceFormat
    from stages.formats.webdataset import WebDatasetFormat

    formats = {f.name: f for f in (PickapicFormat, PreferenceFormat, WebDatasetFormat)}
    if name not in formats:
        raise InputError(f"--format must be one of {sorted(formats)}, got {name!r}")
    if columns and not formats[name].default_columns:
        raise InputError(f"--columns does not apply to --format {name} (its columns are fixed)")
    return formats[name](src, columns)
