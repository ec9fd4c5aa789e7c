"""Graceful stop on SIGTERM / SIGINT: the trainer finishes the optimizer step in progress, writes a checkpoint and
exits with EXIT_PREEMPTED, so `--resume latest` continues exactly where it stopped.

Clusters announce preemption with SIGTERM and a grace period (Kubernetes 30 s by default, SLURM's KillWait, torchrun
forwards it to every worker's process group), and a terminal sends SIGINT on Ctrl-C. The handler only records the
signal; the loop checks it once per step, and all ranks agree through the step's existing all-reduce, so every
rank stops after the same step. A second signal stops at once (the last complete checkpoint stays intact).
DataLoader workers ignore both signals: they are stopped by their parent (or die with it), so a signal sent to the
whole process group cannot take the data away from the step being finished.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import sys
from types import FrameType

# sysexits.h EX_TEMPFAIL, "temporary failure, the user is invited to retry": a scheduler can requeue on it (e.g. a
# Kubernetes podFailurePolicy on exit code 75) instead of counting a failure
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Records the first SIGTERM/SIGINT; restores the default action so that a second one ends the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        # a second signal: the default action (terminate) at once
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        print(
            f"\nreceived {signal.Signals(signum).name}: finishing the current step, then writing a checkpoint "
            f"and exiting with {EXIT_PREEMPTED} (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    @property
    def requested(self) -> bool:
        return self.signum is not None


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the parent trainer decides when its workers stop (see the module docstring)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stop_workers_at_exit() -> None:
    """Make sure the parent does stop them when it fails. multiprocessing's exit handler stops daemonic children
    with SIGTERM, which the workers ignore, and then joins them; after an uncaught exception (e.g. a checkpoint
    write failing with 'File too large') the traceback still holds the loader, which so never tells its workers
    to stop, and the failed trainer waited for them forever. Registered after multiprocessing's own handler, this
    one runs first (atexit is last in, first out) and SIGKILLs what is left: the workers only read data."""
    atexit.unregister(_kill_children)
    atexit.register(_kill_children)


def _kill_children() -> None:
    children = multiprocessing.active_children()
    if children:
        # torch's handler would call the kill a worker failure
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
        child.join()
