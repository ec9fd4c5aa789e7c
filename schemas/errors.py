"""The one error type for bad input: a flag, a file, a column or damaged data. The CLIs print its message (which
names what is wrong and what to do) and exit 2, instead of a traceback. A failure of the machine rather than the
input (a full disk, a permission, an I/O error) is printed as one line too, with exit 74."""

import errno

# refused before any work started
EXIT_INPUT = 2
# sysexits.h EX_IOERR: the environment failed the process (disk full, permission denied, I/O error)
EXIT_ENVIRONMENT = 74
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}
)


class InputError(ValueError):
    """Bad input, found before work starts or while reading data; the message names the flag, file or key."""


def environment_message(e: OSError) -> str | None:
    """`path: what failed` for an OSError the environment caused, None for any other (a bug keeps its traceback)."""
    if e.errno not in ENVIRONMENT_ERRNOS:
        return None
    return f"{e.filename}: {e.strerror}" if e.filename else str(e.strerror)
