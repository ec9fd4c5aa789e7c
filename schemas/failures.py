"""Environment failures (disk full, a file-size limit, permission denied, a read-only or failing disk, a worker
killed for memory): one line naming the path or the actor, and exit 74, instead of a library's traceback.

Exit codes of the project's CLIs: 2 for a user's mistake (schemas/errors.py InputError, found before anything is
written), 74 (EX_IOERR of sysexits.h) for a failure of the machine or cluster the run was on, 1 (a traceback) for a
bug. The full traceback of an environment failure goes to a log file the line names, so nothing is lost.

  EnvironmentFailure(message)          raised by a caller's own check (e.g. a small `ulimit -f`): report prints it
  describe(error, where) -> str|None   the one line for an environment failure anywhere in `error`'s chain (Ray's
                                       task errors included), None for anything else; `where`: the path written
  report(error, where, log_dir, prog, held) -> int|None
                                       `error: LINE (full traceback: LOG)` on stderr and EXIT_ENVIRONMENT, or None
                                       when `error` is not one (the caller re-raises it)
  console_errors_held(logger, held)    a `with` block keeping a logger's ERROR records (Ray Data's task
                                       tracebacks) off the console, collected into `held` for report's log file
  file_size_limit() -> int|None        RLIMIT_FSIZE (`ulimit -f`) in bytes
  environment_exit(oserror, advice)    `error: path: strerror` + advice and EXIT_ENVIRONMENT for an environment
                                       OSError, re-raised otherwise (the trainer's and evaluate's line)
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

EXIT_ENVIRONMENT = 74
LOG_NAME = "_logs"

# errno → what it means for the run, said once
_ERRNO_MEANING = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "a file reached the file-size limit",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error (a failing disk or network mount)",
}
# Ray's errors for a worker or actor that died (killed for memory, a node lost), by class name: no Ray import here
_RAY_DEATHS = {
    "OutOfMemoryError": "a Ray worker was killed for lack of memory",
    "ActorDiedError": "a Ray actor kept dying and ran out of restarts",
    "RayActorError": "a Ray actor kept dying and ran out of restarts",
    "ActorUnavailableError": "a Ray actor became unavailable",
    "WorkerCrashedError": "a Ray worker process crashed",
    "NodeDiedError": "a Ray node died",
}


class EnvironmentFailure(Exception):
    """A failure of the machine or cluster, not of the user's input nor of the code; its message is the line."""


def file_size_limit() -> int | None:
    """This process's RLIMIT_FSIZE soft limit in bytes (`ulimit -f`), or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def environment_exit(e: OSError, advice: str = "") -> int:
    """Print an OSError the environment caused as one `error: path: what failed` line (its own strerror, which may
    carry sizes) followed by `advice`, and return EXIT_ENVIRONMENT; any other OSError is a bug and is re-raised."""
    if e.errno not in _ERRNO_MEANING:
        raise e
    message = f"{e.filename}: {e.strerror}" if e.filename else str(e.strerror)
    print(f"error: {message}{advice}", file=sys.stderr)
    return EXIT_ENVIRONMENT


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, what it wraps (Ray's `cause`), its __cause__ and __context__, each once."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]


def _errno(e: BaseException) -> int | None:
    if isinstance(e, OSError) and e.errno in _ERRNO_MEANING:
        return e.errno
    # pyarrow's and Ray's messages carry the errno in their text ("[errno 28] No space left on device")
    m = re.search(r"\[errno (\d+)\]", str(e), re.IGNORECASE)
    return int(m[1]) if m and int(m[1]) in _ERRNO_MEANING else None


def _free(where: str) -> str:
    path = Path(where)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def _os_line(code: int, e: BaseException, where: str) -> str:
    path = getattr(e, "filename", None) or where
    line = f"{_ERRNO_MEANING[code]}: {path}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{line} ({_free(path)}); free some space and rerun the same command: it resumes"
    if code == errno.EFBIG:
        limit = file_size_limit()
        size = f"{limit} bytes" if limit is not None else "a limit of the file system"
        return f"{line} ({size}; `ulimit -f`); raise it (`ulimit -f unlimited`) and rerun the same command"
    return line


def describe(error: BaseException, where: str) -> str | None:
    """The one line for an environment failure anywhere in `error`'s chain; `where` is the path the run writes
    (named when the error itself names no file). None when `error` is not an environment failure."""
    for e in _chain(error):
        if isinstance(e, EnvironmentFailure):
            return str(e)
        code = _errno(e)
        if code is not None:
            return _os_line(code, e, where)
    for e in _chain(error):
        for cls in type(e).__mro__:
            if cls.__name__ in _RAY_DEATHS and cls.__module__.startswith("ray"):
                text = str(e)
                # Ray Data's actors are `MapWorker(MapBatches(<the class>))`
                actor = re.search(r"class_name: (\S+)|(MapWorker\(MapBatches\(\w+\)\))", text)
                first = text.strip().splitlines()[0][:200] if text.strip() else ""
                named = f" {actor[1] or actor[2]}" if actor else ""
                return f"{_RAY_DEATHS[cls.__name__]}{named} ({type(e).__name__}: {first})"
    return None


def _save(text: str, log_dir: str, prog: str) -> Path | None:
    """`text` in a new log file in `log_dir` (a local folder), else in the temp dir: a full disk refuses the first."""
    name = f"{prog}-failure-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    folders = [Path(log_dir)] if "://" not in log_dir else []
    for folder in [*folders, Path(tempfile.gettempdir())]:
        path = folder / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        except OSError:
            path.unlink(missing_ok=True)
    return None


@contextlib.contextmanager
def console_errors_held(logger_name: str, held: list[str]) -> Iterator[None]:
    """While inside, ERROR records and tracebacks of `logger_name` (Ray Data logs every failed task's there) are kept
    off its console handlers and collected into `held`, for `report` to put in the log file; when the
    block ends without an error they are printed after all (on an error, the caller reports them)."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def hold(record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and not record.exc_info:
            return True
        held.append(formatter.format(record) + "\n")
        return False

    consoles = [
        h
        for h in logging.getLogger(logger_name).handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    for handler in consoles:
        handler.addFilter(hold)
    try:
        yield
        sys.stderr.write("".join(held))
    finally:
        for handler in consoles:
            handler.removeFilter(hold)


def report(
    error: BaseException, where: str, log_dir: str, prog: str, held: list[str] | None = None
) -> int | None:
    """For an environment failure: its full traceback (after `held`, log lines kept off the console) into a log
    file, `error: LINE` on stderr naming that file, and EXIT_ENVIRONMENT; None for any other error."""
    line = describe(error, where)
    if line is None:
        return None
    if isinstance(error, EnvironmentFailure):
        # found by the caller's own check: the line says it all, and nothing is written
        print(f"error: {line}", file=sys.stderr, flush=True)
        return EXIT_ENVIRONMENT
    path = _save("".join([*(held or []), *traceback.format_exception(error)]), log_dir, prog)
    saved = f" (full traceback: {path})" if path is not None else ""
    print(f"error: {line}{saved}", file=sys.stderr, flush=True)
    return EXIT_ENVIRONMENT
