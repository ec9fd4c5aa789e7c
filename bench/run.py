"""`make bench`: the CPU benchmarks of the data path, the encoder and the tiny-model trainer → BENCHMARKS.md.

Every figure is a median over repeats, measured by running the project's own code (the trainer CLI with
`--data-only`, the encode CLI on a local Ray cluster, the stage's encoder class); each table names the command that
reproduces it. Ratios are measured side by side in one run.

CLI: python -m bench.run [--out BENCHMARKS.md] [--work DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from bench import decode_resize, s3_stream
from bench.harness import REPO, run_cli, sd15_stream_dataset
from bench.report import machine, table
from embedded.synthetic import COLOURS, OBJECTS, render_image
from schemas.manifest import Manifest
from schemas.sample import latent_tensor_names
from stages.decode_images import decode_image
from stages.encode_latents import LatentEncoder, flip_equivariance_gap
from trainer.data import LatentPairStream, make_loader

TINY_MODEL = REPO / "models" / ".init" / "tiny-sd15"
DEMO_DATA = REPO / "data" / "synthetic"


def median_of(repeat: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(repeat))


def bench_stream(data: Path, repeat: int, batches: int) -> tuple[str, dict]:
    rows, figures = [], {}
    for workers in (0, 2):
        results = [
            run_cli(
                [
                    "trainer.train",
                    "--data",
                    str(data),
                    "--data-only",
                    "--max-steps",
                    str(batches),
                    "--batch-size",
                    "16",
                    "--num-workers",
                    str(workers),
                    "--report-to",
                    "none",
                ]
            )
            for _ in range(repeat)
        ]
        rates = [r["pairs_per_s"] for r in results]
        figures[workers] = statistics.median(rates)
        first = statistics.median(r["first_batch_s"] for r in results)
        rows.append(
            [
                workers,
                batches * 16,
                f"{first * 1000:.0f} ms",
                f"{figures[workers]:,.0f}",
                ", ".join(f"{r:,.0f}" for r in rates),
            ]
        )
    cmd = (
        f"python -m trainer.train --data {data.name} --data-only --max-steps {batches} --batch-size 16 "
        "--num-workers W"
    )
    text = (
        "### Trainer data stream at SD1.5 latent size (4×64×64 fp16 moments + cached flips)\n\n"
        f"`{cmd}` — one trainer process; W = its DataLoader workers. Each batch reads the tars, decodes the "
        "safetensors, draws the posterior sample, picks a flip, looks the caption embedding up and collates; "
        "pairs/s is the steady state after the first batch. Goal ≥ 1,500 pairs/s in one process.\n\n"
        + table(["workers W", "pairs per run", "first batch (median)", "pairs/s (median)", "runs"], rows)
    )
    return text, figures


def raw_tensor_bytes(manifest: Manifest, num_pairs: int) -> int:
    c, h, w = manifest.latent_shape
    per_pair = len(latent_tensor_names(manifest.latent_mode, manifest.flip_variants)) * c * h * w * 2
    return per_pair * num_pairs


def bench_bytes(outputs: dict[str, Path]) -> tuple[str, dict]:
    rows, figures = [], {}
    for name, out in outputs.items():
        manifest = Manifest.load(out)
        shard_bytes = sum((out / s.path).stat().st_size for s in manifest.shards)
        raw = raw_tensor_bytes(manifest, manifest.num_samples)
        figures[name] = shard_bytes / raw
        rows.append(
            [
                name,
                "×".join(map(str, manifest.latent_shape)),
                manifest.num_samples,
                f"{shard_bytes / manifest.num_samples:,.0f}",
                f"{raw / manifest.num_samples:,.0f}",
                f"{figures[name]:.3f}",
            ]
        )
    text = (
        "### Pair shard bytes / raw latent tensor bytes\n\n"
        "Sum of the listed pair tars against C·h·w·2 bytes per stored tensor (the JSON metadata, safetensors "
        "headers and tar headers are the overhead). Goal ≤ 1.10.\n\n"
        + table(["output", "latent", "pairs", "bytes/pair on disk", "raw tensor bytes/pair", "ratio"], rows)
    )
    return text, figures


def first_batch_seconds(data: Path, start_batch: int) -> float:
    t0 = time.perf_counter()
    stream = LatentPairStream(data, batch_size=16, seed=0, start_batch=start_batch)
    next(iter(make_loader(stream)))
    return time.perf_counter() - t0


def bench_resume(data: Path, repeat: int) -> tuple[str, dict]:
    figures = {
        start: median_of(repeat, lambda s=start: first_batch_seconds(data, s)) for start in (0, 1_000_000)
    }
    rows = [[f"{start:,}", f"{seconds * 1000:.0f} ms"] for start, seconds in figures.items()]
    text = (
        "### Time to first batch when resuming\n\n"
        "`LatentPairStream(start_batch=N)` + `make_loader` + first batch, batch 16, one process, SD1.5-size data "
        f"({repeat} repeats, median). Goal: the same at step 1,000,000 as at 0 (O(1), no replay).\n\n"
        + table(["resume at batch", "time to first batch"], rows)
        + f"\n\nRatio (1,000,000 vs 0): {figures[1_000_000] / figures[0]:.2f}."
    )
    return text, figures


def bench_decode(repeat: int) -> str:
    vae = AutoencoderKL.from_pretrained(TINY_MODEL, subfolder="vae").eval()
    resolutions = (512, 1024)
    return decode_resize.section(decode_resize.run(resolutions, repeat, vae), resolutions, repeat)


def ensure_demo_inputs() -> None:
    """The synthetic parquet and the tiny random-init model come from the Makefile's own targets."""
    if not (DEMO_DATA / ".done").exists() or not (TINY_MODEL / ".built").exists():
        subprocess.run(["make", "data", "models/.init/tiny-sd15/.built"], cwd=REPO, check=True)


def bench_encode(work: Path, rows: int) -> tuple[str, Path]:
    src = work / f"synthetic-{rows}"
    if not (src / "train").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "embedded.synthetic",
                "--out",
                str(src),
                "--seed",
                "7",
                "--rows",
                str(rows),
                "--val-rows",
                "0",
                "--rows-per-file",
                "500",
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
    out = work / f"encoded-{rows}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    t0 = time.perf_counter()
    cmd = [
        "stages.encode",
        "--src",
        str(src / "train"),
        "--out",
        str(out),
        "--model",
        str(TINY_MODEL),
        "--resolution",
        "64",
    ]
    subprocess.run(
        [sys.executable, "-m", *cmd],
        cwd=REPO,
        check=True,
        capture_output=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    wall = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())
    extra = report["extra"]
    rows_out = [
        [
            rows,
            report["rows_written"],
            f"{wall:.1f}",
            f"{report['seconds']:.1f}",
            f"{rows / report['seconds']:.1f}",
            f"{extra['rows_per_s']:.1f}",
            f"{extra['images_per_s']:.1f}",
            json.dumps(report["dropped"]),
            f"{extra['bytes_per_pair']:,}",
        ]
    ]
    text = (
        "### Encode throughput, tiny SD1.5 model, CPU, local Ray cluster\n\n"
        f"`python -m stages.encode --src synthetic-{rows}/train --out OUT --model models/.init/tiny-sd15 "
        "--resolution 64` — one run, including Ray start-up and model loading in every actor. Rows written/s "
        "and images/s as `report.json` gives them; images counts the VAE inputs (preferred, other and both "
        "flips). The real SD VAE costs 1,082 GFLOP per 512² image, "
        "so on real models the rate is set by the GPU actors, not by this CPU figure.\n\n"
        + table(
            [
                "rows in",
                "rows written",
                "wall s",
                "encode s (report)",
                "rows read/s",
                "rows written/s",
                "VAE images/s",
                "dropped",
                "bytes/pair",
            ],
            rows_out,
        )
        + "\n\n"
        "Two defaults of the encode rest on measurements of the demo's encode (2,687 pairs, a 2-CPU machine), taken "
        "when they were chosen and not re-run here: `--num-encoders 0` sizes the pool by the real cores "
        "(`cluster.ray_session.default_pool_size`), because two 2-thread encoder actors on 2 cores only take turns "
        "(60–63 s with two, 44–53 s with one); and the caption job runs beside the pair chunks rather than before "
        "them (`stages.jobs.encode_all`), so the text actor's start overlaps the decode (each demo encode 7–12 s "
        "sooner)."
    )
    return text, out


def bench_flip_gap() -> str:
    rng = random.Random(0)
    jpegs = [
        render_image(rng, rng.choice(OBJECTS), c, c, False).jpeg for c in rng.choices(list(COLOURS), k=16)
    ]
    images = [decode_image(jpeg, 64)[0] for jpeg in jpegs]
    gap = flip_equivariance_gap(
        LatentEncoder(str(TINY_MODEL), device="cpu"), torch.from_numpy(np.stack(images))
    )
    return (
        "### Flipping cached latents vs encoding flipped pixels\n\n"
        "Relative L2 error ‖flip(E(x)) − E(flip(x))‖ / ‖E(x)‖ of the posterior mean on 16 synthetic images with "
        f"the tiny random-init VAE: **{gap:.2f}**. A conv VAE with arbitrary weights is not flip-equivariant, "
        "so the encoder caches E(flip(x)) (exact, twice the offline VAE work) instead of flipping latents. "
        "The gap for the real SD VAE could not be measured (no weights reachable, here or on any GPU machine lent so far)."
    )


def bench_train(work: Path, latent_data: Path, steps: int, repeat: int) -> str:
    rows = []
    variants = {
        "DPO, full fine-tune": [],
        "DPO, LoRA rank 8": ["--lora-rank", "8"],
        "SFT (preferred only)": ["--loss", "sft"],
        "MaPO (reference-free)": ["--loss", "mapo"],
    }
    for name, extra in variants.items():
        rates, memory = [], []
        for i in range(repeat):
            result = run_cli(
                [
                    "trainer.train",
                    "--data",
                    str(latent_data),
                    "--model",
                    str(TINY_MODEL),
                    "--output-dir",
                    str(work / f"train-{i}"),
                    "--overwrite-output-dir",  # each variant replaces the previous one's run
                    "--max-steps",
                    str(steps),
                    "--batch-size",
                    "16",
                    "--learning-rate",
                    "1e-5",
                    "--no-scale-lr",
                    "--lr-warmup-steps",
                    "0",
                    "--checkpoint-every",
                    "0",
                    "--report-to",
                    "none",
                    "--num-workers",
                    "1",
                    *extra,
                ]
            )
            rates.append(result["pairs_per_s"])
            memory.append(result["peak_rss_mib"])
        rows.append(
            [
                name,
                f"{statistics.median(rates):.0f}",
                ", ".join(f"{r:.0f}" for r in rates),
                f"{statistics.median(memory):.0f}",
            ]
        )
    return (
        "### Trainer step rate, tiny SD1.5 UNet (0.8 M parameters, 8×8 latents), CPU\n\n"
        f"`python -m trainer.train --data OUT --model models/.init/tiny-sd15 --max-steps {steps} "
        "--batch-size 16 --num-workers 1 --checkpoint-every 0 …` on the encode output above — fp32, "
        "whole-run pairs/s as the trainer reports it (policy forward + backward on both images, plus a reference "
        "forward on both except for the reference-free SFT and MaPO, which load no reference UNet) and the "
        "trainer process's peak RSS. All variants use the same batch of 16 pairs.\n\n"
        + table(["objective", "pairs/s (median)", "runs", "peak RSS MiB (median)"], rows)
    )


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown report (default: BENCHMARKS.md)")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller inputs (a smoke run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    repeat = 1 if args.quick else 3
    os.environ.setdefault("WDS_SECURE", "1")
    ensure_demo_inputs()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        stream_data = sd15_stream_dataset(work, 500 if args.quick else 2000)
        sections = []
        text, _ = bench_stream(stream_data, repeat, 20 if args.quick else 200)
        sections.append(text)
        text, _ = s3_stream.bench_s3_stream(stream_data, repeat, 20 if args.quick else 100)
        sections.append(text)
        text, _ = bench_resume(stream_data, 3 if args.quick else 5)
        sections.append(text)
        encode_text, encoded = bench_encode(work, 400 if args.quick else 3000)
        text, _ = bench_bytes(
            {
                "SD1.5-size stream data (moments + flips)": stream_data,
                "tiny SD1.5 encode output (4×8×8, moments + flips)": encoded,
            }
        )
        sections += [
            text,
            encode_text,
            bench_decode(repeat),
            bench_flip_gap(),
            bench_train(work, encoded, 20 if args.quick else 150, repeat),
        ]
    header = (
        "# Benchmarks\n\n"
        f"Produced by `make bench` (`python -m bench.run`) on {time.strftime('%Y-%m-%d')}, machine: {machine()}."
        "\n\nThe GPU figures (DPO step pairs/s and MFU on the real SD1.5/SDXL architectures, data-path "
        "overhead, cached vs on-the-fly encode, SDXL memory per optimizer, VAE rate, MFU and bf16 error) come "
        "from `make bench-gpu` (`python -m bench.gpu`) on a GPU machine and land in `BENCHMARKS_GPU.md`; "
        + (
            "see that file."
            if (REPO / "BENCHMARKS_GPU.md").exists()
            else "no GPU has been lent to this project's sessions yet, so that file does not exist. The harness runs "
            "where diffusers and webdataset are importable (no Ray needed); `tests/test_bench.py` keeps it "
            "working on CPU with the tiny models."
        )
        + "\n"
    )
    Path(args.out).write_text(header + "\n" + "\n\n".join(sections) + "\n")
    print(f"bench: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
