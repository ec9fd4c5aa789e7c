"""Write-aside-then-rename helpers, so a reader never sees a half-written file or directory."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Publish `data` at `path` in one rename; a crash leaves the old file (or none), never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def process_umask() -> int:
    """The umask of this process; os.umask can only read it by setting it, so /proc is asked first."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: str | os.PathLike) -> None:
    """Give every file under `root` the mode open() would (0644 under the usual umask 022).

    Why: safetensors' save_file and tempfile create files 0600, which teammates on shared storage cannot read.
    """
    mode = 0o666 & ~process_umask()
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def publish_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Atomically move a finished directory into place, replacing an older copy if one exists.

    Its files get the process umask's mode first, whatever library wrote them.
    """
    apply_umask(tmp_dir)
    final_dir = Path(final_dir)
    if final_dir.exists():
        trash = final_dir.with_name(f".{final_dir.name}.{uuid.uuid4().hex}.old")
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
