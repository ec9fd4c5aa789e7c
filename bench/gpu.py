"""GPU benchmarks on random-init *real* SD1.5 / SDXL architectures: DPO step pairs/s and MFU, data-path overhead,
cached latents vs the on-the-fly recipe, SDXL memory per optimizer, VAE encode rate, MFU and bf16 error.

Why random init: timing and memory depend on the architecture, not the weights, and no hub is reachable. The
architectures are the published configs below, saved in the diffusers layout (tokenizers and scheduler from the
project's tiny model), so every figure comes through the same `from_pretrained` paths as a real checkpoint. The step
figures run the trainer CLI itself; the VAE and text figures drive the stage's encoder classes directly, so this
runs where diffusers and webdataset exist but Ray does not. MFU = counted FLOPs (torch FlopCounterMode) / time /
the bf16 matmul peak measured on the same GPU in the same run.

`--tiny` swaps in the tiny models at 64 px on whatever device there is, so the whole harness runs on a CPU in
seconds: its numbers mean nothing, and the test suite uses it to keep this file working between GPU loans.

CLI: python -m bench.gpu [--family sd15 sdxl] [--out BENCHMARKS_GPU.md] [--work DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bench.report import machine, table
from embedded.latent_dataset import write_latent_dataset
from embedded.tiny_models import build_tiny_model
from stages.encode_latents import LatentEncoder
from stages.encode_text import CaptionEncoder

REPO = Path(__file__).resolve().parents[1]

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=768,
    hidden_act="quick_gelu",
)
CLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)


# Steps per trainer run; the rate is the trainer's steady_pairs_per_s (after its 2 warm-up steps). Short, because a
# device lease is 15 minutes and every trainer run also pays its start-up and the final UNet export.
STEPS = {"sd15": 25, "sdxl": 15}


@dataclass(frozen=True)
class Setup:
    """What one family is benchmarked with: the model folder, pixel and latent size, batch and step counts."""

    family: str
    model: Path
    resolution: int
    latent_shape: tuple[int, int, int]
    text_dim: int
    pooled_dim: int | None
    batch_size: int
    steps: int  # optimizer steps per trainer run


def build_real_model(family: str, work: Path, device: torch.device) -> Path:
    """Random-init published architectures in the diffusers layout; the tiny model supplies tokenizers/scheduler."""
    out = work / f"real-{family}"
    if (out / ".built").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(build_tiny_model(family, work / f"tiny-{family}"), out)
    sdxl = family == "sdxl"
    vocab = CLIPTextConfig.from_pretrained(out / "text_encoder").vocab_size  # the tiny tokenizer's ids
    specials = dict(
        vocab_size=vocab,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        max_position_embeddings=77,
    )
    with torch.device(device):  # initialising 2.6 B parameters is minutes on a CPU, seconds on a GPU
        parts = {
            "unet": UNet2DConditionModel(**(SDXL_UNET if sdxl else SD15_UNET)),
            "vae": AutoencoderKL(
                **SD_VAE,
                sample_size=1024 if sdxl else 512,
                scaling_factor=0.13025 if sdxl else 0.18215,
                force_upcast=sdxl,
            ),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L, **specials)),
        }
        if sdxl:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG, **specials))
    for name, module in parts.items():
        shutil.rmtree(out / name)
        module.to(torch.float16).save_pretrained(out / name)  # fp16 on disk: half the bytes, same timings
    (out / ".built").touch()
    return out


def make_setup(family: str, work: Path, tiny: bool, device: torch.device) -> Setup:
    sdxl = family == "sdxl"
    if tiny:
        return Setup(
            family,
            build_tiny_model(family, work / f"tiny-{family}"),
            64,
            (4, 8, 8),
            96 if sdxl else 32,
            32 if sdxl else None,
            2,
            4,
        )
    return Setup(
        family,
        build_real_model(family, work, device),
        1024 if sdxl else 512,
        (4, 128, 128) if sdxl else (4, 64, 64),
        2048 if sdxl else 768,
        1280 if sdxl else None,
        2 if sdxl else 16,
        STEPS[family],
    )


def latent_data(setup: Setup, work: Path) -> Path:

    out = work / f"latents-{setup.family}-{setup.resolution}"
    if not (out / "manifest.json").exists():
        write_latent_dataset(
            out,
            family=setup.family,
            num_pairs=max(64, 8 * setup.batch_size),
            shard_size=16,
            latent_shape=setup.latent_shape,
            text_dim=setup.text_dim,
            pooled_dim=setup.pooled_dim,
            num_captions=32,
            text_shard_size=64,
            resolution=setup.resolution,
        )
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, repeat: int = 5) -> float:
    """Median wall time of fn() after one warm-up call, synchronised with the device."""
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
    """The achievable dense matmul rate: bf16 on a GPU, fp32 on a CPU (the denominator of every MFU here)."""
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


def unet_forward_flops(setup: Setup, device: torch.device) -> int:
    """FLOPs of one UNet forward on one image; a DPO pair costs 8 of them (policy forward + backward ≈ 3 forwards
    on two images, reference forward on two)."""
    unet = UNet2DConditionModel.from_pretrained(setup.model, subfolder="unet", torch_dtype=torch.bfloat16).to(
        device
    )
    latents = torch.randn(1, *setup.latent_shape, device=device, dtype=torch.bfloat16)
    kwargs: dict = {
        "encoder_hidden_states": torch.randn(1, 77, setup.text_dim, device=device, dtype=torch.bfloat16)
    }
    if setup.pooled_dim:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, setup.pooled_dim, device=device, dtype=torch.bfloat16),
            "time_ids": torch.tensor([[setup.resolution] * 6], device=device, dtype=torch.bfloat16),
        }
    with torch.no_grad():
        flops = counted_flops(lambda: unet(latents, torch.tensor([500], device=device), **kwargs))
    return flops


def run_trainer(setup: Setup, data: Path, work: Path, steps: int, *extra: str) -> dict:
    """One trainer CLI run; returns its JSON summary, or {"error": last stderr line} when it fails (e.g. OOM)."""
    out = work / "runs" / f"{setup.family}-{steps}-{'-'.join(extra) or 'stream'}"
    shutil.rmtree(out, ignore_errors=True)
    args = [
        sys.executable,
        "-m",
        "trainer.train",
        "--data",
        str(data),
        "--model",
        str(setup.model),
        "--output-dir",
        str(out),
        "--max-steps",
        str(steps),
        "--batch-size",
        str(setup.batch_size),
        "--mixed-precision",
        "bf16" if torch.cuda.is_available() else "no",
        "--checkpoint-every",
        "0",
        "--report-to",
        "none",
        "--lr-warmup-steps",
        "0",
        "--num-workers",
        "2",
        "--caption-dropout",
        "0.2",
        *extra,
    ]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WDS_SECURE": "1"})
    shutil.rmtree(out, ignore_errors=True)  # the exported UNet is GiBs
    if r.returncode != 0:
        with (work / "failed-runs.log").open("a") as log:  # the whole stderr, for the row's one line
            log.write(f"=== {out.name}: exit {r.returncode}\n{r.stderr}\n")
        lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1][:200] if lines else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


class Report:
    """The markdown report, rewritten after every measured row, so a run cut short by a device lease still leaves
    every figure it finished; each row is also printed as it lands."""

    def __init__(self, path: Path, title: str) -> None:
        self.path, self.title = path, title
        self.sections: dict[str, tuple[str, list[str], list[list[object]]]] = {}

    def section(self, key: str, heading: str, headers: list[str]) -> None:
        self.sections[key] = (heading, headers, [])

    def add(self, key: str, row: list[object]) -> None:
        self.sections[key][2].append(row)
        print(f"bench.gpu: {key}: " + " | ".join(map(str, row)), flush=True)
        self.write()

    def write(self) -> None:
        parts = [self.title] + [
            f"{heading}\n\n{table(headers, rows)}"
            for heading, headers, rows in self.sections.values()
            if rows
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n\n".join(parts) + "\n")
        tmp.replace(self.path)


def failure(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"failed: {type(e).__name__}: {lines[-1][:160] if lines else ''}"


def measured(fn: Callable[[], list[object]], prefix: list[object]) -> list[object]:
    """fn's row, or the error it raised, so one failing measurement does not end the benchmark."""
    try:
        return prefix + fn()
    except Exception as e:  # any failure is a result worth recording
        return [*prefix, failure(e)]


def measured_rows(fn: Callable[[], list[list[object]]], count: int) -> list[list[object]]:
    """fn's rows, or `count` rows naming the error it raised."""
    try:
        return fn()
    except Exception as e:
        return [[failure(e)]] * count


def step_row(rate: float | str, flops_pair: float, peak: float) -> list[object]:
    return (
        [f"{rate:.2f}", f"{rate * flops_pair / 1e12 / peak:.1%}"] if isinstance(rate, float) else [rate, ""]
    )


def on_the_fly_row(setup: Setup, device: torch.device, pairs_per_s: float) -> list[object]:
    """The official recipe also VAE-encodes both images and text-encodes the caption at every step."""
    dtype = "bf16" if device.type == "cuda" else "fp32"
    vae = LatentEncoder(str(setup.model), dtype=dtype, device=str(device), flip=False)
    text = CaptionEncoder(str(setup.model), dtype=dtype, device=str(device))
    b = setup.batch_size
    pixels = torch.randint(0, 256, (2 * b, setup.resolution, setup.resolution, 3), dtype=torch.uint8)
    captions = [f"a photo of object {i}" for i in range(b)]
    encode_s = seconds_per_call(lambda: (vae.moments(pixels), text.encode(captions)), device)
    cached_s = b / pairs_per_s
    return [
        f"{pairs_per_s:.2f}",
        f"{b / (cached_s + encode_s):.2f}",
        f"{(cached_s + encode_s) / cached_s:.2f}×",
    ]


def vae_rows(setup: Setup, device: torch.device, peak: float) -> list[list[object]]:
    batch = 2 if setup.resolution >= 1024 else 8
    pixels = torch.randint(0, 256, (batch, setup.resolution, setup.resolution, 3), dtype=torch.uint8)
    reference = LatentEncoder(str(setup.model), dtype="fp32", device=str(device), flip=False).moments(pixels)[
        0
    ]
    rows = []
    for dtype in ("fp16", "bf16"):
        encoder = LatentEncoder(str(setup.model), dtype=dtype, device=str(device), flip=False)
        flops = counted_flops(lambda e=encoder: e.moments(pixels))
        seconds = seconds_per_call(lambda e=encoder: e.moments(pixels), device)
        error = float((encoder.moments(pixels)[0] - reference).norm() / reference.norm())
        rows.append(
            [
                f"{batch / seconds:.1f}",
                f"{flops / batch / 1e9:,.0f}",
                f"{flops / seconds / 1e12 / peak:.1%}",
                f"{error:.2e}",
            ]
        )
    return rows


def memory_row(result: dict) -> list[object]:
    if "error" in result:
        return [result["error"]]
    return [result.get("max_memory_gib", "n/a (no CUDA)")]


@dataclass
class Family:
    """One family's set-up and what later passes reuse: the data, FLOPs per pair and the streamed step rate."""

    setup: Setup
    data: Path
    flops_pair: float
    streamed: float | str = "not measured"


def trainer_rate(family: Family, work: Path, *extra: str) -> tuple[float | str, dict]:
    """Steady pairs/s of one trainer run of a variant (the trainer's own figure, after its warm-up steps), or its
    last error line (e.g. out of memory); and the run's summary (its peak memory)."""
    result = run_trainer(family.setup, family.data, work, family.setup.steps, *extra)
    if "error" in result:
        return f"failed: {result['error']}", result
    return float(result["steady_pairs_per_s"]), result


def first_pass(setup: Setup, work: Path, device: torch.device, peak: float, report: Report) -> Family:
    """The figures worth most: the streamed step, cached vs on-the-fly, the VAE and (SDXL) memory per optimizer."""
    family = Family(setup, latent_data(setup, work), 8 * unet_forward_flops(setup, device))
    name = setup.family
    family.streamed, summary = trainer_rate(family, work)
    report.add("step", [name, "full, real loader", *step_row(family.streamed, family.flops_pair, peak)])
    if isinstance(family.streamed, float):
        report.add("otf", measured(lambda: on_the_fly_row(setup, device, family.streamed), [name]))
    for dtype, row in zip(
        ("fp16", "bf16"), measured_rows(lambda: vae_rows(setup, device, peak), 2), strict=True
    ):
        report.add("vae", [name, setup.resolution, dtype, *row])
    if name == "sdxl":
        report.add("memory", [name, "adamw", "off", setup.batch_size, *memory_row(summary)])
        for optimizer, checkpointing in (("adamw", True), ("adafactor", False), ("adafactor", True)):
            extra = ["--optimizer", optimizer] + (["--gradient-checkpointing"] if checkpointing else [])
            result = run_trainer(setup, family.data, work, 3, *extra)
            row = [name, optimizer, "on" if checkpointing else "off", setup.batch_size, *memory_row(result)]
            report.add("memory", row)
    return family


def data_path_pass(family: Family, work: Path, peak: float, report: Report) -> None:
    """The same step with one batch kept on the device: what the loader costs."""
    name = family.setup.family
    resident, _ = trainer_rate(family, work, "--fixed-batch")
    report.add(
        "step", [name, "full, batch resident on the device", *step_row(resident, family.flops_pair, peak)]
    )
    if isinstance(family.streamed, float) and isinstance(resident, float):
        overhead = f"{resident / family.streamed:.3f}×"
        report.add("step", [name, "data-path overhead (resident / loader time per pair)", overhead, ""])


def lora_pass(family: Family, work: Path, peak: float, report: Report) -> None:
    rate, _ = trainer_rate(family, work, "--lora-rank", "64")
    report.add(
        "step", [family.setup.family, "LoRA rank 64, real loader", *step_row(rate, family.flops_pair, peak)]
    )


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--family",
        nargs="+",
        default=["sd15", "sdxl"],
        choices=["sd15", "sdxl"],
        help="architectures to measure (default: both)",
    )
    parser.add_argument(
        "--out", default="BENCHMARKS_GPU.md", help="markdown report (default: BENCHMARKS_GPU.md)"
    )
    parser.add_argument("--work", default=None, help="scratch directory (models and data are kept there)")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models at 64 px: a smoke run, numbers mean nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-gpu-"))
    peak = matmul_peak_tflops(device, args.tiny)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    cmd = f"python -m bench.gpu --family {' '.join(args.family)}" + (" --tiny" if args.tiny else "")
    report = Report(
        Path(args.out),
        f"# GPU benchmarks\n\n`{cmd}` on {name} ({machine()}), {time.strftime('%Y-%m-%d')}. Matmul peak measured "
        f"in the same run: **{peak:.1f} TFLOP/s** ({'bf16' if device.type == 'cuda' else 'fp32'}); every MFU "
        "below is against it."
        + (" Tiny models at 64 px: a smoke run, the numbers mean nothing." if args.tiny else ""),
    )
    report.section(
        "step",
        "## DPO train step (trainer CLI, bf16 autocast, AdamW)\n\nThe trainer's steady pairs/s (wall time after "
        f"its first 2 steps) in one run of {STEPS['sd15']} steps (SD1.5) or {STEPS['sdxl']} (SDXL); MFU counts 8 "
        "UNet forwards per pair (FlopCounterMode).",
        ["family", "variant", "pairs/s", "MFU"],
    )
    report.section(
        "otf",
        "## Cached latents vs the on-the-fly recipe (VAE-encode both images + text-encode the caption per step)",
        ["family", "cached pairs/s", "on-the-fly pairs/s", "speed-up"],
    )
    report.section(
        "memory",
        "## SDXL full fine-tune, policy + reference on one GPU, no offload: peak memory (GiB)",
        ["family", "optimizer", "gradient checkpointing", "batch", "peak GiB"],
    )
    report.section(
        "vae",
        "## VAE encode (stages.encode_latents.LatentEncoder)",
        ["family", "resolution", "dtype", "images/s", "GFLOP/image", "MFU", "rel. error vs fp32"],
    )
    report.write()
    # Pass by pass across the families, most valuable first: a lease that ends early loses the least.
    families = []
    for name in args.family:
        try:
            families.append(first_pass(make_setup(name, work, args.tiny, device), work, device, peak, report))
        except Exception as e:  # the other family may still run
            report.add("step", [name, "(benchmark stopped)", failure(e), ""])
    for later_pass in (data_path_pass, lora_pass):
        for family in families:
            try:
                later_pass(family, work, peak, report)
            except Exception as e:
                report.add("step", [family.setup.family, later_pass.__name__, failure(e), ""])
    print(f"bench.gpu: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
