"""A real S3 API on 127.0.0.1 for the tests and the benchmark: moto's standalone server (dev dependency
`moto[server]`), in its own process. Clients reach it the standard way, through the AWS_* variables of `env`."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    env: dict[str, str]  # the AWS_* variables that point a client at this server

    def new_bucket(self) -> str:
        """A fresh bucket; returns its s3:// URL. Call with `env` in os.environ."""
        import fsspec

        name = f"t{uuid.uuid4().hex[:12]}"
        fsspec.filesystem("s3", use_listings_cache=False).mkdir(name)
        return f"s3://{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server() -> tuple[subprocess.Popen, S3Server]:
    """moto's server on a free loopback port, up and answering; the caller terminates the process."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server on {endpoint} did not start") from None
            time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    return proc, S3Server(endpoint, env)
