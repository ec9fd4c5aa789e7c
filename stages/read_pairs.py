"""The prescan: every input file's cheap columns (the format's `read_ids_labels_captions`), read on the driver before
any Ray work, and the row filter the Ray job applies.

Why a pre-scan: a file-level problem (unreadable file, missing column or member, wrong type, duplicate ranking_id)
must stop the job with a message naming the file before anything is published, and the label/caption drops, the row
count and the set of unique captions all come from three small columns, without decoding any image.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.config import TIE_POLICIES
from schemas.errors import InputError
from schemas.manifest import DROP_BAD_LABEL, DROP_NULL_CAPTION, DROP_TIE

if TYPE_CHECKING:
    from stages.formats import PairFormat

TIE_LABEL = 0.5


def valid_labels(tie_policy: str) -> list[float]:
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    return [0.0, 1.0, TIE_LABEL] if tie_policy == "keep" else [0.0, 1.0]


def row_filter(tie_policy: str) -> Any:
    """The Ray expression that keeps the rows the prescan counts as kept."""
    from ray.data.expressions import col

    return col("label_0").is_in(valid_labels(tie_policy)) & col("caption").is_not_null()


@dataclass
class FileCounts:
    rows: int
    dropped: dict[str, int]


@dataclass
class Prescan:
    per_file: dict[str, FileCounts]
    captions: set[str] = field(default_factory=set)

    @property
    def rows_read(self) -> int:
        return sum(s.rows for s in self.per_file.values())

    def dropped(self, files: list[str]) -> Counter:
        total: Counter = Counter()
        for f in files:
            total.update(self.per_file[f].dropped)
        return total


def count_file(fmt: PairFormat, path: str, tie_policy: str) -> tuple[FileCounts, pa.Table]:
    """Count the rows and the label/caption drops of one file; returns the counts and its (ranking_id, caption) of
    kept rows."""
    table = fmt.read_ids_labels_captions(path)
    if table["ranking_id"].null_count:
        raise InputError(f"{path}: column 'ranking_id' has {table['ranking_id'].null_count} null values")
    label = table["label_0"]
    try:
        label = pc.cast(label, pa.float64())
    except pa.ArrowInvalid as e:
        raise InputError(f"{path}: column 'label_0' is not numeric ({label.type})") from e
    valid = pc.fill_null(pc.is_in(label, pa.array(valid_labels(tie_policy))), False)
    tie = pc.fill_null(pc.equal(label, TIE_LABEL), False)
    null_caption = pc.and_(valid, pc.is_null(table["caption"]))
    keep = pc.and_(valid, pc.invert(null_caption))
    n_tie = 0 if tie_policy == "keep" else pc.sum(tie).as_py() or 0
    n_invalid = len(table) - (pc.sum(valid).as_py() or 0)
    dropped = {
        DROP_TIE: n_tie,
        DROP_BAD_LABEL: n_invalid - n_tie,
        DROP_NULL_CAPTION: pc.sum(null_caption).as_py() or 0,
    }
    return FileCounts(len(table), {k: v for k, v in dropped.items() if v}), table.filter(keep)


def prescan(fmt: PairFormat, files: list[str], tie_policy: str) -> Prescan:
    """Count every file; a duplicate ranking_id among kept rows (the resume key) is an error naming both files."""
    result = Prescan(per_file={})
    ids, owners = [], []
    for i, path in enumerate(files):
        counts, kept = count_file(fmt, path, tie_policy)
        result.per_file[path] = counts
        result.captions.update(kept["caption"].to_pylist())
        ids.append(kept["ranking_id"].to_numpy())
        owners.append(np.full(len(kept), i))
    _check_unique_ids(files, np.concatenate(ids), np.concatenate(owners))
    return result


def _check_unique_ids(files: list[str], ids: np.ndarray, owners: np.ndarray) -> None:
    order = np.argsort(ids, kind="stable")
    dup = np.nonzero(ids[order][1:] == ids[order][:-1])[0]
    if len(dup):
        a, b = order[dup[0]], order[dup[0] + 1]
        raise InputError(f"duplicate ranking_id {int(ids[a])} in {files[owners[a]]} and {files[owners[b]]}")
