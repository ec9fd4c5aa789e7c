"""What the evaluation CLIs share: a user's mistake (a flag, a file, a record) is one line naming it and exit 2,
never a traceback; Ctrl-C says how to go on."""

from __future__ import annotations

import sys
from collections.abc import Callable

from schemas.errors import InputError


def run_cli(action: Callable[[], object], interrupted: str) -> int:
    try:
        action()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0
