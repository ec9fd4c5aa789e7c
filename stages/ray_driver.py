"""How the encode driver joins or starts Ray without hanging on a dead address or leaving processes behind.

Why: `ray.init(address=...)` retries a dead head forever, and a local cluster started by `ray.init()` leaves its
dashboard and runtime-env agents running when the driver is killed with SIGKILL (they are children of the raylet,
which dies without stopping them). So the address is probed first, and a local cluster gets a reaper: a small
process in its own session that, once the driver is gone however it died, stops every process the driver started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CONNECT_TIMEOUT_S = 10.0  # TCP probe of the head
INIT_TIMEOUT_S = 60.0  # ray.init against a live port that never answers as a GCS


class RayUnreachable(Exception):
    """No Ray cluster answers at the given address; the message names the address and where it came from."""


def probe_address(address: str, source: str) -> None:
    """Raise RayUnreachable unless a TCP connection to the head's `host:port` (or `ray://host:port`) opens."""
    if address in ("auto", "local"):
        return  # Ray itself finds (or refuses) the cluster on this machine, without retrying forever
    hostport = address.removeprefix("ray://").split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnreachable(f"{source} {address!r}: expected HOST:PORT (or ray://HOST:PORT)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise RayUnreachable(
            f"{source} {address}: no Ray cluster answers there ({e}); start it with `ray start --head`, fix the "
            "address, or leave both --ray-address and RAY_ADDRESS unset to run on a local cluster"
        ) from e


def init_with_deadline(source: str, **init_kwargs: object) -> None:
    """ray.init that gives up after INIT_TIMEOUT_S: past the probe, a port that is open but not a Ray head
    would otherwise keep ray.init retrying forever. Nothing has been written when it gives up."""
    import ray

    def give_up() -> None:
        print(
            f"error: {source} {init_kwargs.get('address')}: the port is open but no Ray cluster answered within "
            f"{INIT_TIMEOUT_S:.0f}s; is it the head's GCS port (ray start --port)?",
            file=sys.stderr,
            flush=True,
        )
        os._exit(2)

    timer = threading.Timer(INIT_TIMEOUT_S, give_up)
    timer.daemon = True
    timer.start()
    try:
        ray.init(**init_kwargs)
    finally:
        timer.cancel()


def start_reaper() -> subprocess.Popen:
    """Watch this process from a separate session; when it is gone, stop everything it had started."""
    return subprocess.Popen(
        [sys.executable, "-m", "stages.ray_driver", str(os.getpid())],
        cwd=Path(__file__).resolve().parents[1],
        start_new_session=True,  # Ctrl-C in a terminal signals the driver's process group, not the reaper
        stdin=subprocess.DEVNULL,
    )


def _proc_table() -> dict[int, tuple[int, str]]:
    """Live pid → (parent pid, start time); the start time tells a process from a later one reusing its pid.
    Zombies are left out: they are dead, only not yet collected by their new parent."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def descendants(root: int, table: dict[int, tuple[int, str]]) -> dict[int, str]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = table[pid][1]
        todo.extend(children.get(pid, []))
    return found


def reap(driver: int, poll_s: float = 0.5, grace_s: float = 3.0) -> None:
    """Track the driver's descendants while it lives; then TERM, and after `grace_s` KILL, the ones still there."""
    seen: dict[int, str] = {}
    while os.getppid() == driver:  # re-parented: the driver has exited, however it died
        seen.update(descendants(driver, _proc_table()))
        seen.pop(os.getpid(), None)
        time.sleep(poll_s)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        table = _proc_table()
        alive = [pid for pid, start in seen.items() if pid in table and table[pid][1] == start]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            table = _proc_table()
            alive = [pid for pid in alive if pid in table and table[pid][1] == seen[pid]]


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the driver's end stops the reaper
    reap(int(sys.argv[1]))
