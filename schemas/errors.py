"""The one error type for bad input: a flag, a file, a column or damaged data. The CLIs print its message (which
names what is wrong and what to do) and exit 2, instead of a traceback. A failure of the machine rather than the
input (a full disk, a permission, an I/O error) is schemas/failures.py's: one line too, with exit 74."""

# refused before any work started
EXIT_INPUT = 2


class InputError(ValueError):
    """Bad input, found before work starts or while reading data; the message names the flag, file or key."""
