"""What bench/gpu.py's rows share: each family's set-up, the trainer config of a variant, the measured rates,
the device timing primitives and the report (rewritten after every row)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.gpu_models import build_real_model
from bench.gpu_step import StepMeasure, measure_step, release_device_memory
from bench.report import table
from embedded.latent_dataset import write_latent_dataset
from embedded.tiny_models import build_tiny_model
from schemas.config import TrainConfig

DATASHEET_TFLOPS = 989.4  # dense bf16, H100/H200 SXM
# an option joins the best combination when it beats eager by more than this (run-to-run spread is ~1%)
GAIN_TO_KEEP = 1.02


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
