"""The trainer's data stream from object storage vs local disk: the same shards, one process, side by side.

The object store is moto's standalone S3 server on 127.0.0.1 (the one the tests use), so the figure is an upper
bound set by that server and this machine's CPU rather than by a network; what it shows is the cost of the S3
client path itself (ranged text reads, read-ahead shard streaming, HTTP) against page-cache reads of the same
bytes.

CLI: python -m bench.s3_stream [--out BENCHMARKS.md] [--quick]  (updates only its own section of --out)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import run_cli, sd15_stream_dataset
from bench.report import table

HEADING = "### Trainer data stream from S3 (loopback server) vs local disk"
BATCH = 16


def bench_s3_stream(data: Path, repeat: int, batches: int) -> tuple[str, dict[str, float]]:
    """Upload `data` to a fresh bucket on a loopback S3 server and stream both copies with `--data-only`."""
    import fsspec

    from embedded.s3_server import start_s3_server  # moto[server] is a dev dependency

    load_before = os.getloadavg()[0]
    proc, server = start_s3_server()
    saved = dict(os.environ)
    os.environ.update(server.env)
    try:
        fs = fsspec.filesystem("s3", use_listings_cache=False)
        fs.mkdir("bench")
        t0 = time.perf_counter()
        fs.put(str(data), "bench/stream", recursive=True)
        upload_s = time.perf_counter() - t0
        sources = {"local disk": str(data), "S3 (loopback)": "s3://bench/stream"}
        rates: dict[str, list[float]] = {name: [] for name in sources}
        firsts: dict[str, list[float]] = {name: [] for name in sources}
        for _ in range(repeat):  # interleaved, so drift in machine load hits both alike
            for name, url in sources.items():
                args = ["trainer.train", "--data", url, "--data-only", "--max-steps", str(batches)]
                args += ["--batch-size", str(BATCH), "--num-workers", "0", "--report-to", "none"]
                r = run_cli(args, env=server.env)
                rates[name].append(r["pairs_per_s"])
                firsts[name].append(r["first_batch_s"])
    finally:
        os.environ.clear()
        os.environ.update(saved)
        proc.terminate()
        proc.wait(timeout=30)
    load = (load_before, os.getloadavg()[0])
    medians = {name: statistics.median(r) for name, r in rates.items()}
    rows = [
        [
            name,
            f"{statistics.median(firsts[name]) * 1000:.0f} ms",
            f"{medians[name]:,.0f}",
            ", ".join(f"{r:,.0f}" for r in rates[name]),
        ]
        for name in sources
    ]
    size_mb = sum(f.stat().st_size for f in data.rglob("*") if f.is_file()) / 2**20
    ratio = medians["S3 (loopback)"] / medians["local disk"]
    text = (
        f"{HEADING}\n\n"
        f"`python -m trainer.train --data DATA --data-only --max-steps {batches} --batch-size {BATCH} "
        "--num-workers 0` with DATA the SD1.5-size stream data above on local disk and the same files uploaded "
        f"({size_mb:,.0f} MiB in {upload_s:.1f} s) to moto's S3 server on 127.0.0.1 (`s3://bench/stream`, "
        "AWS_ENDPOINT_URL set): one process, no DataLoader workers, runs interleaved. Shards stream front to back "
        "with read-ahead (no download first); caption embeddings are ranged GETs behind a bounded cache. "
        f"`python -m bench.s3_stream` reproduces this table alone. 1-minute load average before/after: "
        f"{load[0]:.0f}/{load[1]:.0f} (other work on the machine slows both sources alike; compare the ratio). "
        f"S3 / local = {ratio:.2f}.\n\n"
        + table(["source", "first batch (median)", "pairs/s (median)", "runs"], rows)
    )
    return text, medians


def splice_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of `path` (from its heading to the next one), or append it."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(HEADING)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    else:
        end = old.find("\n### ", start + len(HEADING))
        new = old[:start] + text + ("\n" + old[end:] if end >= 0 else "\n")
    path.write_text(new)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file whose S3 section is updated")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller inputs (a smoke run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    os.environ.setdefault("WDS_SECURE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        data = sd15_stream_dataset(Path(tmp), 500 if args.quick else 2000)
        text, medians = bench_s3_stream(data, 1 if args.quick else 3, 20 if args.quick else 100)
    splice_section(Path(args.out), text)
    print(f"bench: {medians} → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
