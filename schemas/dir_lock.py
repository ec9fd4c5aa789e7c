"""One writer per output directory: the lock the encode holds on its OUT and the trainer on its --output-dir.

A POSIX record lock (lockf) on a file in the directory, which the kernel releases however the holder dies (kill -9
too), so a killed run never leaves a stale lock. Not flock: a flock is shared with every forked child, so a killed
trainer's DataLoader workers, still exiting, would keep its rerun out; a record lock belongs to the process alone.
The lock file names its holder (pid, host, since when), which a refused second writer reports.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from schemas.errors import InputError


class DirectoryBusy(InputError):
    """Another process holds the directory's lock; the message names the holder."""


class DirLock:
    """Holds `directory/name` from its creation until `close()` (or the end of a `with` block). Closing removes the
    lock file, and the directory too when this lock created it and nothing else was written there."""

    def __init__(self, directory: str | os.PathLike, name: str, refusal: Callable[[str], str]) -> None:
        """`refusal(holder)`: the message of the DirectoryBusy raised when another process holds the lock."""
        self.directory = Path(directory)
        self.created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / name
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):
                # EAGAIN or EACCES, as the platform reports a held lock
                holder = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                raise DirectoryBusy(refusal(holder or "holder unknown")) from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    # not a file its previous holder removed after we opened it
                    break
            os.close(fd)
        self.fd = fd
        since = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}".encode())

    def close(self) -> None:
        os.unlink(self.path)
        os.close(self.fd)
        if self.created and not any(self.directory.iterdir()):
            self.directory.rmdir()

    def __enter__(self) -> DirLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
