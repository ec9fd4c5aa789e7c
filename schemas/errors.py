"""The one error type for bad input: a flag, a file, a column or damaged data. The CLIs print its message (which
names what is wrong and what to do) and exit 2, instead of a traceback."""


class InputError(ValueError):
    """Bad input, found before work starts or while reading data; the message names the flag, file or key."""
