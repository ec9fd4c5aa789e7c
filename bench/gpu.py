"""GPU benchmarks on random-init *real* SD1.5 / SDXL architectures (bench/gpu_models.py): the DPO step per speed
option (pairs/s, MFU, peak memory), the data-path overhead, cached latents vs the on-the-fly recipe, and the VAE
encode rate per setting with its error against fp32.

The step rows run the trainer's own builder, loader and `train_step` in this process (bench/gpu_step.py), one
variant after another; the VAE and text rows drive the stage's encoder classes directly, so this runs where
diffusers and webdataset exist but Ray does not. MFU = FLOPs counted by torch's FlopCounterMode on one real step
(policy forward + backward and reference forward; printed per pair) / time / a peak: the bf16 matmul rate measured
in the same run, and the datasheet's dense bf16 989 TFLOP/s (H100/H200 SXM).

Rows run most valuable first and the report is rewritten after each one, so a run cut short by a device lease (or
by `--budget-s`) keeps every figure it finished; rows past the budget are listed as not measured.

`--tiny` swaps in the tiny models at 64 px on whatever device there is: the whole harness in seconds on a CPU, its
numbers meaningless; the test suite runs it to keep this file working between GPU loans.

CLI: python -m bench.gpu [--family sd15 sdxl] [--out BENCHMARKS_GPU.md] [--work DIR] [--tiny] [--budget-s S]
     [--no-compile] [--rows PATTERN ...]
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.gpu_flow import flow_rows
from bench.gpu_harness import (
    DATASHEET_TFLOPS,
    GAIN_TO_KEEP,
    Bench,
    Report,
    failure,
    make_setup,
    matmul_peak_tflops,
)
from bench.gpu_vae import batch_invariance_note, on_the_fly_row, vae_row
from bench.report import machine

SDPA_BACKENDS = ("flash", "cudnn", "efficient")


def best_options(bench: Bench, family: str) -> dict[str, object]:
    """The eager options that each beat plain eager at the family's batch (the fastest SDPA backend among them)."""
    batch = bench.setups[family].batch_size
    eager = bench.rates.get((family, "eager", batch))
    if eager is None:
        return {}
    chosen: dict[str, object] = {}
    singles = {"channels-last": {"channels_last": True}, "fused AdamW": {"adamw_impl": "fused"}}
    for label, options in singles.items():
        if bench.rates.get((family, label, batch), 0.0) > GAIN_TO_KEEP * eager:
            chosen.update(options)
    backends = {b: bench.rates.get((family, f"SDPA {b}", batch), 0.0) for b in SDPA_BACKENDS}
    fastest = max(backends, key=backends.get)
    if backends[fastest] > GAIN_TO_KEEP * eager:
        chosen["attention_backend"] = fastest
    return chosen


def describe(options: dict[str, object]) -> str:
    names = {"channels_last": "channels-last", "adamw_impl": "fused AdamW", "compile": "compile"}
    parts = [names[k] for k in names if options.get(k)]
    if options.get("attention_backend", "auto") != "auto":
        parts.append(f"SDPA {options['attention_backend']}")
    return " + ".join(parts) or "none better than eager"


def rows(bench: Bench, families: list[str], flow: bool = False) -> list[tuple[str, Callable[[], None]]]:
    """(name, row) in the order they run, what is worth most first: SD1.5's step options and their best
    combination, compiled; the VAE settings; then SDXL, LoRA and the remaining batch sizes and compilations."""
    sd15, sdxl = "sd15" in families, "sdxl" in families
    full_batch = {f: bench.setups[f].batch_size for f in families}

    def best(family: str, batch: int | None = None, compile: bool = False, lora: bool = False) -> None:
        options = best_options(bench, "sd15" if sd15 else family)
        options = {**options, **({"compile": True} if compile else {}), **({"lora_rank": 64} if lora else {})}
        prefix = "LoRA rank 64, " if lora else ""
        bench.step(family, f"{prefix}best: {describe(options)}", batch, **options)

    def vae(family: str, big: bool = True, dtype: str = "fp16", **speed: bool) -> Callable[[], None]:
        batches = bench.setups[family].vae_batches
        return lambda: vae_row(bench, family, batches[-1] if big else batches[0], dtype, **speed)

    out: list[tuple[str, Callable[[], None]]] = []
    if sd15:
        out += [
            ("sd15 eager", lambda: bench.step("sd15", "eager")),
            ("sd15 channels-last", lambda: bench.step("sd15", "channels-last", channels_last=True)),
            ("sd15 fused", lambda: bench.step("sd15", "fused AdamW", adamw_impl="fused")),
            *[
                (f"sd15 sdpa {b}", lambda b=b: bench.step("sd15", f"SDPA {b}", attention_backend=b))
                for b in SDPA_BACKENDS
            ],
            ("sd15 b32", lambda: bench.step("sd15", "eager", 2 * full_batch["sd15"])),
            ("sd15 best eager", lambda: best("sd15")),
            ("sd15 best compiled", lambda: best("sd15", compile=True)),
            ("sd15 vae", vae("sd15", big=False)),
            ("sd15 vae big", vae("sd15")),
            ("sd15 vae bf16", vae("sd15", dtype="bf16")),
            ("sd15 vae channels-last", vae("sd15", channels_last=True)),
            ("sd15 vae batch invariance", lambda: batch_invariance_note(bench, "sd15")),
            ("sd15 otf", lambda: on_the_fly_row(bench, "sd15")),
            ("sd15 resident", lambda: bench.step("sd15", "eager, batch resident", fixed_batch=True)),
            ("sd15 lora", lambda: bench.step("sd15", "LoRA rank 64", lora_rank=64)),
        ]
    if sdxl:
        out += [
            ("sdxl eager", lambda: bench.step("sdxl", "eager")),
            ("sdxl best eager", lambda: best("sdxl")),
            ("sdxl lora", lambda: bench.step("sdxl", "LoRA rank 64", lora_rank=64)),
            ("sdxl vae", vae("sdxl", big=False)),
            ("sdxl vae big", vae("sdxl")),
            ("sdxl vae channels-last", vae("sdxl", channels_last=True)),
            ("sdxl otf", lambda: on_the_fly_row(bench, "sdxl")),
        ]
    if flow:
        out += flow_rows(bench)
    if sd15:
        out += [
            ("sd15 b8", lambda: bench.step("sd15", "eager", full_batch["sd15"] // 2)),
            ("sd15 best compiled b32", lambda: best("sd15", 2 * full_batch["sd15"], compile=True)),
            ("sd15 vae compiled", vae("sd15", channels_last=True, compile=True)),
            ("sd15 lora best compiled", lambda: best("sd15", compile=True, lora=True)),
        ]
    if sdxl:
        out += [
            ("sdxl best compiled", lambda: best("sdxl", compile=True)),
            ("sdxl vae compiled", vae("sdxl", channels_last=True, compile=True)),
        ]
    return out


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--family",
        nargs="+",
        default=["sd15", "sdxl", "flow"],
        choices=["sd15", "sdxl", "flow"],
        help="architectures: SD1.5, SDXL, flow (SD3.5-medium and FLUX.1-dev) (default: all)",
    )
    parser.add_argument(
        "--out", default="BENCHMARKS_GPU.md", help="markdown report (default: BENCHMARKS_GPU.md)"
    )
    parser.add_argument("--work", default=None, help="scratch directory (models and data are kept there)")
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64 px: a smoke run")
    parser.add_argument("--budget-s", type=float, default=None, help="start no row after this many seconds")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument(
        "--rows", nargs="+", default=None, help="only the rows whose names match these fnmatch patterns"
    )
    return parser


def header(bench: Bench, cmd: str) -> str:
    name = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "CPU"
    return (
        f"# GPU benchmarks\n\n`{cmd}` on {name} ({machine()}), {time.strftime('%Y-%m-%d')}. bf16 matmul peak "
        f"measured in the same run: **{bench.peak:.1f} TFLOP/s**; MFU is given against it and against the "
        f"datasheet's {DATASHEET_TFLOPS:.0f}."
        + (" Tiny models at 64 px: a smoke run, the numbers mean nothing." if bench.tiny else "")
    )


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak_tflops(device, args.tiny)
    bench = Bench(Report(Path(args.out), ""), work, device, peak, args.tiny)
    cmd = "python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    bench.report.title = header(bench, cmd.strip())
    bench.report.section(
        "step",
        "## DPO train step (the trainer's build, loader and train_step; bf16 autocast, AdamW, fp32 master weights)"
        "\n\nSteady pairs/s over the timed steps after the warm-up steps (whose seconds, compilation included, "
        "are the warm-up column); peak = torch.cuda.max_memory_allocated (GiB); gradient vs eager (compiled rows): "
        "relative L2 distance of one micro-batch's gradient from the same modules forced eager.",
        [
            "family",
            "variant",
            "batch",
            "pairs/s",
            "MFU (measured peak)",
            "MFU (989)",
            "peak GiB",
            "warm-up s",
        ],
    )
    bench.report.section(
        "flow",
        "## Flow-DPO step of the flow-matching transformers at 1024² (random init, bf16 autocast, batch 1 pair)",
        [
            "architecture",
            "variant",
            "batch",
            "pairs/s",
            "TFLOP/pair",
            "MFU (measured peak)",
            "MFU (989)",
            "peak GiB",
        ],
    )
    bench.report.section(
        "otf",
        "## Cached latents vs the on-the-fly recipe (VAE-encode both images + text-encode the caption per step)",
        ["family", "fastest cached variant", "cached pairs/s", "on-the-fly pairs/s", "speed-up"],
    )
    bench.report.section(
        "vae",
        "## VAE encode (stages.encode_latents.LatentEncoder; error = relative L2 of the posterior mean vs fp32)",
        ["family", "resolution", "images/s", "setting", "batch", "GFLOP/image", "MFU", "rel. error vs fp32"],
    )
    bench.report.write()
    for family in (f for f in args.family if f != "flow"):
        try:
            bench.setups[family] = make_setup(family, work, args.tiny, device)
        except Exception as e:
            bench.report.note(f"{family}: set-up failed: {failure(e)}")
    families = [f for f in args.family if f in bench.setups]
    skipped = []
    for name, row in rows(bench, families, flow="flow" in args.family):
        if args.no_compile and "compiled" in name:
            continue
        if args.rows and not any(fnmatch.fnmatch(name, pattern) for pattern in args.rows):
            continue
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            skipped.append(name)
            continue
        try:
            row()
        except Exception as e:  # one broken row must not end the benchmark
            bench.report.note(f"{name}: {failure(e)}")
    if skipped:
        bench.report.note(f"not measured (past --budget-s {args.budget_s:.0f}): {', '.join(skipped)}")
    bench.report.note(f"total {time.monotonic() - start:.0f} s")
    print(f"bench.gpu: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
