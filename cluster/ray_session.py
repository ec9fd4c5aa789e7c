"""How a driver (the encode, the sampler) joins or starts Ray without hanging on a dead address or leaving processes
behind.

Why: `ray.init(address=...)` retries a dead head forever, and a local cluster started by `ray.init()` leaves its
dashboard and runtime-env agents running when the driver is killed with SIGKILL (they are children of the raylet,
which dies without stopping them). So the address is probed first, and a local cluster gets a reaper: a small
process in its own session that, once the driver is gone however it died, stops every process the driver started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from schemas import storage
from schemas.errors import InputError

# TCP probe of the head
CONNECT_TIMEOUT_S = 10.0
# ray.init against a live port that never answers as a GCS
INIT_TIMEOUT_S = 60.0


class RayUnreachable(InputError):
    """No Ray cluster answers at the given address; the message names the address and where it came from."""


def probe_address(address: str, source: str) -> None:
    """Raise RayUnreachable unless a TCP connection to the head's `host:port` (or `ray://host:port`) opens."""
    if address in ("auto", "local"):
        # Ray itself finds (or refuses) the cluster on this machine, without retrying forever
        return
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


def init_ray(address: str | None, verbose: bool = False) -> bool:
    """Join `address` (or RAY_ADDRESS, as under `ray job submit`); otherwise start a private local cluster.

    Returns True when this process started Ray (and so shuts it down). A new local cluster gets at least 4 logical
    CPUs: on a 2-CPU machine Ray Data's Write op otherwise starves behind decode tasks. The storage settings of this
    environment (AWS_*, FSSPEC_*) go to the workers with the job, so they reach the same object store; under
    `ray job submit` the job's own runtime environment decides instead. Unless `verbose`, Ray's INFO logging, the
    workers' output and Ray Data's per-operator bars stay off the console (errors still raise here): the job's own
    progress line (cluster/progress.py) reports instead.
    """
    import ray
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = verbose
    context.enable_auto_log_stats = verbose
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    # its one warning says that the bars are off, which is what quiet asks for
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if verbose else logging.ERROR)
    if ray.is_initialized():
        return False
    quiet = {} if verbose else {"logging_level": logging.WARNING, "log_to_driver": False}
    source = "--ray-address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    env = storage.storage_env()
    runtime_env = {"env_vars": env} if env and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ else None
    if address:
        probe_address(address, source)
        init_with_deadline(source, address=address, runtime_env=runtime_env, **quiet)
    else:
        # stops this local cluster's processes however the driver dies, SIGKILL included
        start_reaper()
        ray.init(
            num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, runtime_env=runtime_env, **quiet
        )
    return True


@contextlib.contextmanager
def ray_session(address: str | None, verbose: bool = False) -> Iterator[bool]:
    """`init_ray` for the length of a `with` block, which gets whether this process started Ray; a cluster it
    started is shut down at the end."""
    started = init_ray(address, verbose)
    try:
        yield started
    finally:
        if started:
            import ray

            ray.shutdown()


def default_pool_size(resources: dict[str, float], local_cores: int | None) -> int:
    """Model actors (encoders, sampling pipelines) a cluster holds by default: one per GPU, else one per 2 CPUs
    (each runs two torch threads). `local_cores`: the cores of this machine when the cluster is the private one init_ray started, which
    advertises at least 4 CPUs however few the machine has; two 2-thread actors on 2 cores only take turns
    (BENCHMARKS.md, encode section)."""
    if resources.get("GPU"):
        return int(resources["GPU"])
    return max(1, (local_cores or int(resources.get("CPU", 2))) // 2)


def start_reaper() -> subprocess.Popen:
    """Watch this process from a separate session; when it is gone, stop everything it had started."""
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.ray_session", str(os.getpid())],
        cwd=Path(__file__).resolve().parents[1],
        # Ctrl-C in a terminal signals the driver's process group, not the reaper
        start_new_session=True,
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
            # exited meanwhile
            continue
        # after "pid (comm) ": state, ppid, ...
        fields = stat[stat.rindex(")") + 2 :].split()
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
    # re-parented: the driver has exited, however it died
    while os.getppid() == driver:
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
    # only the driver's end stops the reaper
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reap(int(sys.argv[1]))
