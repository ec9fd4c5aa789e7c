"""The input files under `--src`, and how a parquet one is opened: what every format shares."""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import storage
from schemas.errors import InputError

GLOB_CHARS = "*?["


@dataclass(frozen=True)
class InputFile:
    # plain for local files, a URL that Ray and fsspec both open otherwise
    path: str
    # below the directory the SRC part names: what stable ids are derived from
    relative: str


def _is_hidden(path: str, root: str) -> bool:
    """Skip `.cache/`, `.git/`, half-written `.x.tmp` folders and the like below the root."""
    rel = path[len(root) :] if path.startswith(root) else path
    return any(part.startswith(".") for part in rel.split("/") if part)


def _expand(part: str) -> list[str]:
    """A brace pattern `x-{000..009}.tar` → its names; unbalanced braces are an error naming the pattern."""
    from braceexpand import UnbalancedBracesError, braceexpand

    try:
        return list(braceexpand(part))
    except UnbalancedBracesError as e:
        raise InputError(f"--src {part}: {e}") from e


def list_files(src: str, suffix: str) -> list[InputFile]:
    """SRC (directory, glob, brace pattern `x-{000..009}.tar`, comma-separated list, or fsspec URL) → the files
    ending in `suffix`, sorted and unique.

    Directories are searched recursively (a hub snapshot also holds README, .gitattributes, ...). A file's relative
    name is taken below the directory its SRC part names, so the same data copied elsewhere (local ↔ s3://) keeps
    the same relative names, and so the same stable ids.
    """
    protocols, files = set(), {}
    for part in (p.strip() for p in src.split(",")):
        if not part:
            continue
        for expanded in _expand(part):
            fs, path = storage.url_to_fs(expanded)
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            protocols.add("file" if protocol == "local" else protocol)
            if fs.isdir(path):
                root = path.rstrip("/")
                found = [p for p in fs.find(path) if p.endswith(suffix) and not _is_hidden(p, path)]
            elif any(c in path for c in GLOB_CHARS):
                root = path[: min(path.index(c) for c in GLOB_CHARS if c in path)].rpartition("/")[0]
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


def _unreadable(path: str, e: Exception) -> InputError:
    return InputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})")


def open_parquet(path: str) -> tuple[pq.ParquetFile, fsspec.core.OpenFile]:
    """(ParquetFile, the open file to close); an unreadable file is an InputError naming it."""
    f = fsspec.open(path, "rb").open()
    try:
        return pq.ParquetFile(f), f
    except Exception as e:
        # pyarrow/fsspec raise many types for corrupt or unreadable files
        f.close()
        raise _unreadable(path, e) from e


def read_parquet_columns(pf: pq.ParquetFile, path: str, columns: list[str]) -> pa.Table:
    """`columns` of an opened parquet file; a damaged column chunk is an InputError naming the file."""
    try:
        return pf.read(columns=columns)
    except Exception as e:
        # pyarrow raises many types for a damaged column chunk
        raise _unreadable(path, e) from e
