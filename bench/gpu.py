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
    steps: tuple[int, int]  # two run lengths; their difference gives the steady-state step rate


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
            (2, 4),
        )
    return Setup(
        family,
        build_real_model(family, work, device),
        1024 if sdxl else 512,
        (4, 128, 128) if sdxl else (4, 64, 64),
        2048 if sdxl else 768,
        1280 if sdxl else None,
        2 if sdxl else 16,
        (10, 40),
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
        lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1][:200] if lines else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def steady_pairs_per_s(setup: Setup, data: Path, work: Path, *extra: str) -> float | str:
    """Pairs/s between two run lengths, so start-up, compilation and the first batches cancel out; the trainer's
    last error line (e.g. out of memory) when a run fails, so one failing variant does not end the benchmark."""
    short, long = (run_trainer(setup, data, work, n, *extra) for n in setup.steps)
    for result in (short, long):
        if "error" in result:
            return f"failed: {result['error']}"
    return (setup.steps[1] - setup.steps[0]) * setup.batch_size / (long["seconds"] - short["seconds"])


def bench_step(
    setup: Setup, data: Path, work: Path, device: torch.device, peak: float
) -> tuple[list, float | str]:
    flops_pair = 8 * unet_forward_flops(setup, device)
    variants = {
        "full, real loader": (),
        "full, batch resident on the device": ("--fixed-batch",),
        "LoRA rank 64, real loader": ("--lora-rank", "64"),
    }
    rates = {name: steady_pairs_per_s(setup, data, work, *extra) for name, extra in variants.items()}
    rows = [
        [setup.family, name, f"{rate:.2f}", f"{rate * flops_pair / 1e12 / peak:.1%}"]
        if isinstance(rate, float)
        else [setup.family, name, rate, ""]
        for name, rate in rates.items()
    ]
    streamed, resident = rates["full, real loader"], rates["full, batch resident on the device"]
    if isinstance(streamed, float) and isinstance(resident, float):
        rows.append(
            [
                setup.family,
                "data-path overhead (resident / loader time per pair)",
                f"{resident / streamed:.3f}×",
                "",
            ]
        )
    return rows, streamed


def bench_on_the_fly(setup: Setup, device: torch.device, pairs_per_s: float | str) -> list:
    """The official recipe also VAE-encodes both images and text-encodes the caption at every step."""
    if not isinstance(pairs_per_s, float):
        return [[setup.family, pairs_per_s, "", ""]]
    vae = LatentEncoder(
        str(setup.model), dtype="bf16" if device.type == "cuda" else "fp32", device=str(device), flip=False
    )
    text = CaptionEncoder(
        str(setup.model), dtype="bf16" if device.type == "cuda" else "fp32", device=str(device)
    )
    b = setup.batch_size
    pixels = torch.randint(0, 256, (2 * b, setup.resolution, setup.resolution, 3), dtype=torch.uint8)
    captions = [f"a photo of object {i}" for i in range(b)]
    encode_s = seconds_per_call(lambda: (vae.moments(pixels), text.encode(captions)), device)
    cached_s = b / pairs_per_s
    return [
        [
            setup.family,
            f"{pairs_per_s:.2f}",
            f"{b / (cached_s + encode_s):.2f}",
            f"{(cached_s + encode_s) / cached_s:.2f}×",
        ]
    ]


def bench_memory(setup: Setup, data: Path, work: Path) -> list:
    rows = []
    for optimizer in ("adamw", "adafactor"):
        for checkpointing in (False, True):
            extra = ["--optimizer", optimizer] + (["--gradient-checkpointing"] if checkpointing else [])
            result = run_trainer(setup, data, work, 3, *extra)
            peak = result.get("max_memory_gib", "n/a (no CUDA)") if "error" not in result else result["error"]
            rows.append([setup.family, optimizer, "on" if checkpointing else "off", setup.batch_size, peak])
    return rows


def bench_vae(setup: Setup, device: torch.device, peak: float) -> list:
    rows = []
    batch = 2 if setup.resolution >= 1024 else 8
    pixels = torch.randint(0, 256, (batch, setup.resolution, setup.resolution, 3), dtype=torch.uint8)
    reference = LatentEncoder(str(setup.model), dtype="fp32", device=str(device), flip=False).moments(pixels)[
        0
    ]
    for dtype in ("fp16", "bf16"):
        encoder = LatentEncoder(str(setup.model), dtype=dtype, device=str(device), flip=False)
        flops = counted_flops(lambda e=encoder: e.moments(pixels))
        seconds = seconds_per_call(lambda e=encoder: e.moments(pixels), device)
        mean = encoder.moments(pixels)[0]
        error = float((mean - reference).norm() / reference.norm())
        rows.append(
            [
                setup.family,
                setup.resolution,
                dtype,
                f"{batch / seconds:.1f}",
                f"{flops / batch / 1e9:,.0f}",
                f"{flops / seconds / 1e12 / peak:.1%}",
                f"{error:.2e}",
            ]
        )
    return rows


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
    steps, otf, memory, vae = [], [], [], []
    for family in args.family:
        setup = make_setup(family, work, args.tiny, device)
        data = latent_data(setup, work)
        rows, pairs_per_s = bench_step(setup, data, work, device, peak)
        steps += rows
        otf += bench_on_the_fly(setup, device, pairs_per_s)
        if family == "sdxl":
            memory += bench_memory(setup, data, work)
        vae += bench_vae(setup, device, peak)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    cmd = f"python -m bench.gpu --family {' '.join(args.family)}" + (" --tiny" if args.tiny else "")
    sections = [
        f"# GPU benchmarks\n\n`{cmd}` on {name} ({machine()}), {time.strftime('%Y-%m-%d')}. Matmul peak measured "
        f"in the same run: **{peak:.1f} TFLOP/s** ({'bf16' if device.type == 'cuda' else 'fp32'}); every MFU "
        "below is against it."
        + (" Tiny models at 64 px: a smoke run, the numbers mean nothing." if args.tiny else ""),
        "## DPO train step (trainer CLI, bf16 autocast, AdamW)\n\nSteady pairs/s between runs of "
        f"{' and '.join(map(str, setup.steps))} steps; MFU counts 8 UNet forwards per pair (FlopCounterMode).\n\n"
        + table(["family", "variant", "pairs/s", "MFU"], steps),
        "## Cached latents vs the on-the-fly recipe (VAE-encode both images + text-encode the caption per step)\n\n"
        + table(["family", "cached pairs/s", "on-the-fly pairs/s", "speed-up"], otf),
        "## VAE encode (stages.encode_latents.LatentEncoder)\n\n"
        + table(
            ["family", "resolution", "dtype", "images/s", "GFLOP/image", "MFU", "rel. error vs fp32"], vae
        ),
    ]
    if memory:
        sections.insert(
            3,
            "## SDXL full fine-tune, policy + reference on one GPU, no offload: peak memory (GiB)\n\n"
            + table(["family", "optimizer", "gradient checkpointing", "batch", "peak GiB"], memory),
        )
    Path(args.out).write_text("\n\n".join(sections) + "\n")
    print(f"bench.gpu: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
