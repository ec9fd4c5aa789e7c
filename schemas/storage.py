"""Paths or URLs: one small set of file operations for local disk and any fsspec filesystem (s3://, gs://, ...).

Object storage has no rename, so nothing here relies on one there: a remote JSON file is a single PUT (an object
appears whole or not at all), and the outputs are committed by such a file written last (`_part.json` per chunk,
`manifest.json` for the whole output). Local files keep the write-aside-then-rename of `schemas.atomic`.
Remote filesystems are configured the standard way, e.g. `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY` for s3:// (read by botocore, and so by s3fs).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import IO, Any

import fsspec

from schemas.atomic import atomic_write_bytes
from schemas.errors import InputError

# environment variables that configure remote storage; the encode forwards them to its Ray workers
STORAGE_ENV_PREFIXES = ("AWS_", "FSSPEC_")


def is_remote(url: str | os.PathLike) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def local_path(url: str | os.PathLike) -> str:
    """A local path or file:// URL → an absolute plain path; remote URLs are returned unchanged."""
    url = str(url)
    if is_remote(url):
        return url.rstrip("/")
    return os.path.abspath(url.removeprefix("file://"))


def join(base: str | os.PathLike, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def url_to_fs(url: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """No listings cache: Ray workers write the tars this process lists, so a cached listing would miss them. An
    unknown protocol, or one whose filesystem package is not installed, is an InputError naming the URL."""
    try:
        if not is_remote(url):
            return fsspec.core.url_to_fs(str(url))
        return fsspec.core.url_to_fs(str(url), use_listings_cache=False)
    except (ValueError, ImportError) as e:
        raise InputError(f"{url}: {e}") from e


def exists(url: str | os.PathLike) -> bool:
    if not is_remote(url):
        return os.path.exists(local_path(url))
    fs, path = url_to_fs(url)
    return fs.exists(path)


def open_read(url: str | os.PathLike, block_size: int = 8 * 2**20) -> IO[bytes]:
    """A file object for sequential reads: remote files are fetched in `block_size` pieces with read-ahead, so a
    reader streams a large object without downloading it first."""
    if not is_remote(url):
        return open(local_path(url), "rb")
    fs, path = url_to_fs(url)
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")


def read_bytes(url: str | os.PathLike) -> bytes:
    with open_read(url) as f:
        return f.read()


def read_range(url: str | os.PathLike, start: int, size: int) -> bytes:
    """`size` bytes from offset `start`: one ranged GET on object storage."""
    fs, path = url_to_fs(url)
    return fs.cat_file(path, start=start, end=start + size)


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    """Publish `data` at `url` whole: a rename on local disk, a single PUT on object storage."""
    if not is_remote(url):
        atomic_write_bytes(local_path(url), data)
        return
    fs, path = url_to_fs(url)
    fs.pipe_file(path, data)


def write_json(url: str | os.PathLike, obj: Any) -> None:
    """The one JSON writer (indented, sorted keys), published whole as `write_bytes` does."""
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str | os.PathLike) -> Any:
    """The one JSON reader; a damaged or unreadable file is an InputError naming it (a missing one stays
    FileNotFoundError)."""
    try:
        return json.loads(read_bytes(url))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"{url}: not readable as JSON ({e})") from e


def size(url: str | os.PathLike) -> int:
    if not is_remote(url):
        return os.path.getsize(local_path(url))
    fs, path = url_to_fs(url)
    return int(fs.size(path))


def fingerprint(url: str | os.PathLike) -> dict[str, Any]:
    """What tells a file changed in place: its size, and the object store's ETag where it gives one, else the
    modification time (nanoseconds on local disk)."""
    if not is_remote(url):
        stat = os.stat(local_path(url))
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    fs, path = url_to_fs(url)
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag")
    changed = {"etag": str(etag)} if etag else {"mtime": str(info.get("LastModified") or info.get("mtime"))}
    return {"size": int(info["size"]), **changed}


def list_names(url: str | os.PathLike) -> list[str]:
    """Sorted names directly below a directory (or key prefix); empty when it does not exist."""
    fs, path = url_to_fs(url)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted({e.rstrip("/").rpartition("/")[2] for e in entries} - {""})


def remove(url: str | os.PathLike) -> None:
    """Delete a file or a whole directory (key prefix); nothing to do when it does not exist."""
    if not is_remote(url):
        path = local_path(url)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
        return
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def arrow_filesystem(url: str | os.PathLike) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for Ray's readers and writers: None and the absolute path for local
    files; the fsspec filesystem wrapped for Arrow otherwise, so every fsspec URL works in Ray as it does here."""
    if not is_remote(url):
        return None, local_path(url)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = url_to_fs(url)
    return PyFileSystem(FSSpecHandler(fs)), path


def storage_env() -> dict[str, str]:
    """The storage configuration of this process's environment, to hand on to Ray workers."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}
