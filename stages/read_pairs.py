"""Find the input files and pre-scan their cheap columns (through the format's `scan`) on the driver, before any Ray
work.

Why a pre-scan: a file-level problem (unreadable file, missing column or member, wrong type, duplicate ranking_id)
must stop the job with a message naming the file before anything is published, and the label/caption drops, the row
count and the set of unique captions all come from three small columns, without decoding any image.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.config import TIE_POLICIES
from schemas.manifest import DROP_BAD_LABEL, DROP_NULL_CAPTION, DROP_TIE

if TYPE_CHECKING:
    from stages.formats import PairFormat

REQUIRED_COLUMNS = ("ranking_id", "caption", "jpg_0", "jpg_1", "label_0", "image_0_uid", "image_1_uid")
TIE_LABEL = 0.5


class InputError(Exception):
    """A file-level problem with the input; the message names the file (and column)."""


def valid_labels(tie_policy: str) -> list[float]:
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    return [0.0, 1.0, TIE_LABEL] if tie_policy == "keep" else [0.0, 1.0]


def row_filter(tie_policy: str) -> Any:
    """The Ray expression that keeps encodable rows; Ray pushes it into the parquet scan."""
    from ray.data.expressions import col

    return col("label_0").is_in(valid_labels(tie_policy)) & col("caption").is_not_null()


def _is_hidden(path: str, root: str) -> bool:
    """Skip `.cache/`, `.git/`, half-written `.x.tmp` folders and the like below the root."""
    rel = path[len(root) :] if path.startswith(root) else path
    return any(part.startswith(".") for part in rel.split("/") if part)


@dataclass(frozen=True)
class InputFile:
    path: str  # plain for local files, a URL that Ray and fsspec both open otherwise
    relative: str  # below the directory the SRC part names: what stable ids are derived from


def list_files(src: str, suffix: str) -> list[InputFile]:
    """SRC (directory, glob, brace pattern `x-{000..009}.tar`, comma-separated list, or fsspec URL) → the files
    ending in `suffix`, sorted and unique.

    Directories are searched recursively (a hub snapshot also holds README, .gitattributes, ...). A file's relative
    name is taken below the directory its SRC part names, so the same data copied elsewhere (local ↔ s3://) keeps
    the same relative names, and so the same stable ids.
    """
    from braceexpand import braceexpand

    protocols, files = set(), {}
    for part in (p.strip() for p in src.split(",")):
        if not part:
            continue
        for expanded in braceexpand(part):
            fs, path = fsspec.core.url_to_fs(expanded)
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            protocols.add("file" if protocol == "local" else protocol)
            if fs.isdir(path):
                root = path.rstrip("/")
                found = [p for p in fs.find(path) if p.endswith(suffix) and not _is_hidden(p, path)]
            elif any(c in path for c in "*?["):
                root = path[: min(path.index(c) for c in "*?[" if c in path)].rpartition("/")[0]
                found = [p for p in fs.glob(path) if p.endswith(suffix) and fs.isfile(p)]
            elif fs.isfile(path):
                root, found = path.rpartition("/")[0], [path]
            else:
                raise InputError(f"{expanded}: no such file or directory")
            if not found:
                raise InputError(f"{expanded}: no {suffix} files found")
            for p in found:
                url = p if protocols == {"file"} else fs.unstrip_protocol(p)
                files[url] = InputFile(url, p[len(root) :].lstrip("/"))
    if len(protocols) > 1:
        raise InputError(f"{src}: mixes filesystems {sorted(protocols)}; use one")
    if not files:
        raise InputError(f"{src!r}: no input given")
    return [files[k] for k in sorted(files)]


def list_parquet_files(src: str) -> tuple[str, list[str]]:
    """SRC → (protocol, sorted parquet paths); see `list_files`."""
    found = list_files(src, ".parquet")
    protocol = fsspec.core.url_to_fs(found[0].path)[0].protocol
    protocol = protocol if isinstance(protocol, str) else protocol[0]
    return ("file" if protocol == "local" else protocol), [f.path for f in found]


@dataclass
class FileScan:
    rows: int
    dropped: dict[str, int]


@dataclass
class Prescan:
    files: list[str]
    per_file: dict[str, FileScan]
    captions: set[str] = field(default_factory=set)

    @property
    def rows_read(self) -> int:
        return sum(s.rows for s in self.per_file.values())

    def dropped(self, files: list[str]) -> Counter:
        total: Counter = Counter()
        for f in files:
            total.update(self.per_file[f].dropped)
        return total


def scan_file(fmt: PairFormat, path: str, tie_policy: str) -> tuple[FileScan, pa.Table]:
    """Count the label/caption drops of one file; returns the scan and its (ranking_id, caption) of kept rows."""
    table = fmt.scan(path)
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
    return FileScan(len(table), {k: v for k, v in dropped.items() if v}), table.filter(keep)


def prescan(fmt: PairFormat, files: list[str], tie_policy: str) -> Prescan:
    """Scan every file; a duplicate ranking_id among kept rows (the resume key) is an error naming both files."""
    result = Prescan(files=files, per_file={})
    ids, owners = [], []
    for i, path in enumerate(files):
        scan, kept = scan_file(fmt, path, tie_policy)
        result.per_file[path] = scan
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
