"""A Ray job's one progress line: items done / total, items/s and ETA across the whole job (the encode's rows, the
sampler's images).

Why: Ray Data's own bars count blocks per operator and show "Total Progress: 0/?" for the length of a job, so a
multi-hour run had no ETA. The driver knows how many items the job will make; it, or a driver thread polling a
counter actor the pipeline reports to, turns that into one line: redrawn in place in a terminal, a plain new line
every 30 s in a log file (`ray job logs`, CI), and a final exact line at the end.
"""

from __future__ import annotations

import sys
import threading
import time
from datetime import timedelta
from typing import Any, TextIO

TERMINAL_INTERVAL_S = 1.0
LOG_INTERVAL_S = 30.0


class RowProgress:
    """One line for the whole job; `done` starts at the rows published by earlier runs, the rate counts only the
    rows of this run. Other console lines go through `print` so they do not tear the line in a terminal."""

    def __init__(
        self,
        total: int,
        done: int = 0,
        stream: TextIO | None = None,
        label: str = "encode",
        unit: str = "rows",
    ) -> None:
        self.label, self.unit = label, unit
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.interval_s = TERMINAL_INTERVAL_S if self.tty else LOG_INTERVAL_S
        self.total, self.first, self.done = total, done, done
        self.start = self.last_shown = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._drawn = False

    def line(self, now: float) -> str:
        rate = (self.done - self.first) / max(now - self.start, 1e-9)
        left = max(self.total - self.done, 0)
        eta = str(timedelta(seconds=round(left / rate))) if rate > 0 else "?"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({percent:.1f}%), {rate:.1f} {self.unit}/s, "
            f"ETA {eta}"
        )

    def update(self, done: int, *, final: bool = False, now: float | None = None) -> None:
        """Record `done`; show the line once the interval has passed, and always when `final` (the count is
        then exact: decode drops make it a little lower than the prescan's total, which becomes it)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self.done = done
            if final:
                self.total = done
            elif now - self.last_shown < self.interval_s:
                return
            self.last_shown = now
            if self.tty:
                self.stream.write("\r\x1b[K" + self.line(now) + ("\n" if final else ""))
                self._drawn = not final
            else:
                self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def print(self, text: str) -> None:
        """A console line of its own; in a terminal the progress line is cleared first and redrawn below it."""
        with self._lock:
            if self._drawn:
                self.stream.write("\r\x1b[K")
            self.stream.write(text + "\n")
            if self._drawn:
                self.stream.write(self.line(time.monotonic()))
            self.stream.flush()

    def watch(self, counter: Any) -> None:
        """Poll a counter actor (its `count()`: rows this run) from a driver thread until `stop`; its rows add to those done before this run."""
        import ray

        def poll() -> None:
            while not self._stop.wait(min(self.interval_s, TERMINAL_INTERVAL_S)):
                self.update(self.first + ray.get(counter.count.remote()))

        self._watcher = threading.Thread(target=poll, name=f"{self.label}-progress", daemon=True)
        self._watcher.start()

    def finish(self, counter: Any) -> None:
        """Stop polling and print the exact final line."""
        import ray

        self.stop()
        self.update(self.first + ray.get(counter.count.remote()), final=True)

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
