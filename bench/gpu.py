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
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.gpu_models import build_real_model
from bench.gpu_step import StepMeasure, measure_step, release_device_memory
from bench.report import machine, table
from embedded.latent_dataset import write_latent_dataset
from embedded.tiny_models import build_tiny_model
from schemas.config import TrainConfig
from stages.encode_latents import LatentEncoder
from stages.encode_text import CaptionEncoder

DATASHEET_TFLOPS = 989.4  # dense bf16, H100/H200 SXM
# an option joins the best combination when it beats eager by more than this (run-to-run spread is ~1%)
GAIN_TO_KEEP = 1.02
SDPA_BACKENDS = ("flash", "cudnn", "efficient")


@dataclass(frozen=True)
class Setup:
    """One family as benchmarked: its model folder, pixel and latent size, batch, and step counts."""

    family: str
    model: Path
    resolution: int
    latent_shape: tuple[int, int, int]
    text_dim: int
    pooled_dim: int | None
    batch_size: int
    steps: int  # timed optimizer steps per variant
    warmup: int  # untimed steps before them (compilation happens here)
    vae_batches: tuple[int, ...]


def make_setup(family: str, work: Path, tiny: bool, device: torch.device) -> Setup:
    sdxl = family == "sdxl"
    if tiny:
        model = build_tiny_model(family, work / f"tiny-{family}")
        return Setup(family, model, 64, (4, 8, 8), 96 if sdxl else 32, 32 if sdxl else None, 2, 2, 2, (2, 4))
    return Setup(
        family,
        build_real_model(family, work, device),
        1024 if sdxl else 512,
        (4, 128, 128) if sdxl else (4, 64, 64),
        2048 if sdxl else 768,
        1280 if sdxl else None,
        2 if sdxl else 16,
        6 if sdxl else 10,
        3,
        (2, 8) if sdxl else (8, 32),
    )


def latent_data(setup: Setup, batch_size: int, work: Path) -> Path:
    out = work / f"latents-{setup.family}-{setup.resolution}-{batch_size}"
    if not (out / "manifest.json").exists():
        write_latent_dataset(
            out,
            family=setup.family,
            num_pairs=max(64, 8 * batch_size),
            shard_size=16,
            latent_shape=setup.latent_shape,
            text_dim=setup.text_dim,
            pooled_dim=setup.pooled_dim,
            num_captions=32,
            text_shard_size=64,
            resolution=setup.resolution,
        )
    return out


def train_config(setup: Setup, work: Path, batch_size: int | None = None, **options: object) -> TrainConfig:
    """The trainer's config for one variant: bf16 autocast on a GPU, AdamW, constant lr, no tracker, checkpoint
    or held-out evaluation; `options` are TrainConfig fields (the speed flags, lora_rank, fixed_batch)."""
    batch_size = batch_size or setup.batch_size
    return TrainConfig(
        data=str(latent_data(setup, batch_size, work)),
        model=str(setup.model),
        output_dir=str(work / "runs" / setup.family),
        batch_size=batch_size,
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        report_to="none",
        lr_warmup_steps=0,
        checkpoint_every=0,
        num_workers=2,
        caption_dropout=0.2,
        **options,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, repeat: int = 5) -> float:
    """Median wall time of fn() after two warm-up calls (the first may compile), synchronised with the device."""
    fn()
    fn()
    times = []
    for _ in range(repeat):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak_tflops(device: torch.device, tiny: bool) -> float:
    """The achievable dense matmul rate on random data: bf16 on a GPU, fp32 on a CPU."""
    n = 256 if tiny else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    iters = 2 if tiny else 50
    seconds = seconds_per_call(lambda: [a @ b for _ in range(iters)], device)
    return 2 * n**3 * iters / seconds / 1e12


def counted_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class Report:
    """The markdown report, rewritten after every row, so a run cut short still leaves every finished figure;
    each row is also printed as it lands."""

    def __init__(self, path: Path, title: str) -> None:
        self.path, self.title = path, title
        self.sections: dict[str, tuple[str, list[str], list[list[object]]]] = {}
        self.notes: list[str] = []

    def section(self, key: str, heading: str, headers: list[str]) -> None:
        self.sections[key] = (heading, headers, [])

    def add(self, key: str, row: list[object]) -> None:
        self.sections[key][2].append(row)
        print(f"bench.gpu: {key}: " + " | ".join(map(str, row)), flush=True)
        self.write()

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"bench.gpu: {text}", flush=True)
        self.write()

    def write(self) -> None:
        parts = [self.title] + [
            f"{heading}\n\n{table(headers, rows)}"
            for heading, headers, rows in self.sections.values()
            if rows
        ]
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n\n".join(parts) + "\n")
        tmp.replace(self.path)


def failure(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"failed: {type(e).__name__}: {lines[-1][:160] if lines else ''}"


@dataclass
class Bench:
    """What the rows share: the report, the peaks, each family's set-up and FLOPs per pair, and the step rates
    measured so far (so later rows can build the best combination and the on-the-fly comparison)."""

    report: Report
    work: Path
    device: torch.device
    peak: float
    tiny: bool
    setups: dict[str, Setup] = field(default_factory=dict)
    flops_per_pair: dict[str, float] = field(default_factory=dict)
    rates: dict[tuple[str, str, int], float] = field(default_factory=dict)
    options: dict[tuple[str, str, int], dict[str, object]] = field(default_factory=dict)
    vae_flops: dict[tuple[str, int], float] = field(default_factory=dict)  # counted on the eager encoder

    def mfu(self, family: str, rate: float) -> tuple[str, str]:
        flops = self.flops_per_pair.get(family)
        if not flops:
            return "", ""
        achieved = rate * flops / 1e12
        return f"{achieved / self.peak:.1%}", f"{achieved / DATASHEET_TFLOPS:.1%}"

    def step(self, family: str, label: str, batch_size: int | None = None, **options: object) -> float | None:
        """Measure one variant and add its row; returns pairs/s (None when it failed, e.g. out of memory)."""
        setup = self.setups[family]
        batch_size = batch_size or setup.batch_size
        count = (
            family not in self.flops_per_pair and not options.get("compile") and not options.get("lora_rank")
        )
        try:
            m: StepMeasure = measure_step(
                train_config(setup, self.work, batch_size, **options),
                steps=setup.steps,
                warmup=setup.warmup,
                count_flops=count,
            )
        except Exception as e:  # out of memory, a kernel a backend lacks, ...: a result worth recording
            release_device_memory()
            self.report.add("step", [family, label, batch_size, failure(e), "", "", "", "", ""])
            return None
        if m.flops_per_pair:
            self.flops_per_pair[family] = m.flops_per_pair
            self.report.note(
                f"{family}: {m.flops_per_pair / 1e12:.2f} TFLOP per pair counted on one step (policy forward + "
                f"backward on both images, reference forward on both); "
                f"{m.flops_per_pair / self.forward_flops(setup):.2f} forwards of one image"
            )
        self.rates[(family, label, batch_size)] = m.pairs_per_s
        self.options[(family, label, batch_size)] = dict(options)
        peak = f"{m.peak_gib:.1f}" if m.peak_gib is not None else "n/a"
        drift = f"{m.gradient_vs_eager:.1e}" if m.gradient_vs_eager is not None else ""
        row = [family, label, batch_size, f"{m.pairs_per_s:.2f}", *self.mfu(family, m.pairs_per_s), peak]
        self.report.add("step", [*row, f"{m.first_steps_s:.0f}", drift])
        return m.pairs_per_s

    def forward_flops(self, setup: Setup) -> float:
        """FLOPs of one UNet forward on one image, the unit of the "8 forwards per pair" convention."""
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(setup.model, subfolder="unet", torch_dtype=torch.bfloat16)
        unet.to(self.device)
        dtype, device = torch.bfloat16, self.device
        latents = torch.randn(1, *setup.latent_shape, device=device, dtype=dtype)
        kwargs: dict = {
            "encoder_hidden_states": torch.randn(1, 77, setup.text_dim, device=device, dtype=dtype)
        }
        if setup.pooled_dim:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(1, setup.pooled_dim, device=device, dtype=dtype),
                "time_ids": torch.tensor([[setup.resolution] * 6], device=device, dtype=dtype),
            }
        with torch.no_grad():
            return float(counted_flops(lambda: unet(latents, torch.tensor([500], device=device), **kwargs)))


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


def vae_row(bench: Bench, family: str, batch: int, dtype: str, **speed: bool) -> None:
    setup = bench.setups[family]
    label = ", ".join([dtype, *(k.replace("_", "-") for k, v in speed.items() if v)])
    try:
        g = torch.Generator().manual_seed(batch)
        pixels = torch.randint(
            0, 256, (batch, setup.resolution, setup.resolution, 3), dtype=torch.uint8, generator=g
        )
        reference = LatentEncoder(str(setup.model), dtype="fp32", device=str(bench.device), flip=False)
        exact = reference.moments(pixels)[0]
        del reference
        encoder = LatentEncoder(str(setup.model), dtype=dtype, device=str(bench.device), flip=False, **speed)
        seconds = seconds_per_call(lambda: encoder.moments(pixels), bench.device)
        flops = counted_flops(lambda: encoder.moments(pixels)) if not speed.get("compile") else None
        error = float((encoder.moments(pixels)[0] - exact).norm() / exact.norm())
        flops = flops or bench.vae_flops.get((family, batch))
        if flops:
            bench.vae_flops[(family, batch)] = flops
        mfu = f"{flops / seconds / 1e12 / bench.peak:.1%}" if flops else ""
        gflop = f"{flops / batch / 1e9:,.0f}" if flops else ""
        row = [family, setup.resolution, f"{batch / seconds:.1f}", label, batch, gflop, mfu, f"{error:.2e}"]
    except Exception as e:
        row = [family, setup.resolution, failure(e), label, batch, "", "", ""]
    release_device_memory()
    bench.report.add("vae", row)


def on_the_fly_row(bench: Bench, family: str) -> None:
    """The official recipe also VAE-encodes both images and text-encodes the caption at every step."""
    setup = bench.setups[family]
    measured = {k: v for k, v in bench.rates.items() if k[0] == family and k[2] == setup.batch_size}
    if not measured:
        return
    (_, label, batch), rate = max(measured.items(), key=lambda kv: kv[1])
    encode_s = encode_seconds(bench, setup, batch)
    release_device_memory()
    cached_s = batch / rate
    bench.report.add(
        "otf",
        [
            family,
            label,
            f"{rate:.2f}",
            f"{batch / (cached_s + encode_s):.2f}",
            f"{(cached_s + encode_s) / cached_s:.2f}×",
        ],
    )


def encode_seconds(bench: Bench, setup: Setup, batch: int) -> float:
    """What the on-the-fly recipe adds to a step of `batch` pairs: VAE-encode both images, text-encode the caption."""
    dtype = encoder_dtype(bench)
    vae = LatentEncoder(str(setup.model), dtype=dtype, device=str(bench.device), flip=False)
    text = CaptionEncoder(str(setup.model), dtype=dtype, device=str(bench.device))
    pixels = torch.randint(0, 256, (2 * batch, setup.resolution, setup.resolution, 3), dtype=torch.uint8)
    captions = [f"a photo of object {i}" for i in range(batch)]
    return seconds_per_call(lambda: (vae.moments(pixels), text.encode(captions)), bench.device)


def rows(bench: Bench, families: list[str]) -> list[tuple[str, Callable[[], None]]]:
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


def batch_invariance_note(bench: Bench, family: str) -> None:
    """Whether an image's stored (fp16) moments depend on the other images of its VAE call: the encode's image
    reuse changes which images share a call, so this says whether reuse can change a byte."""
    setup = bench.setups[family]
    batch = setup.vae_batches[-1]
    g = torch.Generator().manual_seed(7)
    pixels = torch.randint(
        0, 256, (batch, setup.resolution, setup.resolution, 3), dtype=torch.uint8, generator=g
    )
    encoder = LatentEncoder(str(setup.model), dtype="auto", device=str(bench.device), flip=False)
    together = encoder.moments(pixels)[0].half()
    alone = torch.cat([encoder.moments(pixels[i : i + 1])[0].half() for i in range(batch)])
    half = torch.cat(
        [encoder.moments(pixels[: batch // 2])[0], encoder.moments(pixels[batch // 2 :])[0]]
    ).half()
    differ = [int((together != other).sum()) for other in (alone, half)]
    del encoder
    release_device_memory()
    bench.report.note(
        f"{family} VAE ({encoder_dtype(bench)}), batch invariance of the stored fp16 means: of {together.numel():,} "
        f"values, {differ[0]:,} differ between one call of {batch} and {batch} calls of 1, {differ[1]:,} between "
        f"one call of {batch} and two of {batch // 2}"
    )


def encoder_dtype(bench: Bench) -> str:
    return "fp16" if bench.device.type == "cuda" else "fp32"


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--family",
        nargs="+",
        default=["sd15", "sdxl"],
        choices=["sd15", "sdxl"],
        help="architectures (default: both)",
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
    for family in args.family:
        try:
            bench.setups[family] = make_setup(family, work, args.tiny, device)
        except Exception as e:
            bench.report.note(f"{family}: set-up failed: {failure(e)}")
    families = [f for f in args.family if f in bench.setups]
    skipped = []
    for name, row in rows(bench, families):
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
