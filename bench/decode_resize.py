"""Decode + resize + center crop, per core: the official path (the default) against the fast path it replaced, the
fast path's deviation from the official pixels and latents, and the CPU cores per GPU the encode needs.

Why: decoding is the encode job's CPU cost per image, and the official path decodes JPEGs at full size instead of
at a DCT scale near the target. Sources are textured JPEGs (gradients, noise, stripes, shapes; quality 90, 4:2:0,
the format of Pick-a-Pic's images) of 512–1536 px, decoded one at a time on one thread.

CLI: python -m bench.decode_resize [--resolution 512 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from bench.report import table
from stages.decode_images import decode_image
from tests.fixtures.image_zoo import encoded, textured  # dev-only: the same textured images the tests use

SOURCES = [(512, 512), (768, 768), (1024, 1024), (1024, 1536), (1536, 1024), (1536, 1536)]  # w × h
MODES = {"before (fast)": "fast", "after (official)": "official"}
# GPU side of the cores-per-GPU estimate. FLOPs of the SD VAE encoder counted by torch's FlopCounterMode on the
# published architecture (bench/gpu.py SD_VAE): 1,117 GFLOP at 512² (1,082 of them outside the mid-block attention,
# the figure the README quotes) and 4,879 GFLOP at 1024², where the attention over 128² tokens grows 16×.
VAE_GFLOP = {512: 1117.0, 1024: 4879.0}
# Dense BF16 tensor-core peaks from NVIDIA's datasheets (H100 SXM5: 989.4 TFLOP/s; A100 SXM4: 312 TFLOP/s), at an
# assumed 40% model FLOPs utilisation for the VAE's convolutions; `make bench-gpu` measures the real MFU.
GPUS = {"H100 SXM": 989.4, "A100": 312.0}
ASSUMED_MFU = 0.40
VAE_IMAGES_PER_DECODE = 2  # each decoded image is encoded twice: as is and flipped
GPU_REPORT = Path(__file__).resolve().parents[1] / "BENCHMARKS_GPU.md"


def measured_vae_rates(report: Path = GPU_REPORT) -> tuple[str, dict[int, float]]:
    """(GPU name, resolution → best VAE images/s) from the VAE table of the `make bench-gpu` report, so that a
    regenerated BENCHMARKS.md keeps the measured rows; ("", {}) when no GPU run is recorded."""
    if not report.exists():
        return "", {}
    text = report.read_text()
    device = re.search(r"NVIDIA (\w+)", text)
    section = text.partition("## VAE encode")[2].partition("\n## ")[0]
    lines = [line for line in section.splitlines() if line.strip().startswith("|")]
    if not lines:
        return "", {}
    headers = [c.strip() for c in lines[0].strip().strip("|").split("|")]
    at_resolution, at_rate = headers.index("resolution"), headers.index("images/s")
    rates: dict[int, float] = {}
    for line in lines[2:]:
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        try:
            resolution, rate = int(cells[at_resolution]), float(cells[at_rate].replace(",", ""))
        except (ValueError, IndexError):  # a failed row has no rate
            continue
        rates[resolution] = max(rate, rates.get(resolution, 0.0))
    return (device[1] if device else "GPU"), rates


def sources(seed: int = 0) -> dict[str, bytes]:
    return {
        f"{w}×{h}": encoded(textured(w, h, seed + i), "JPEG", quality=90, subsampling=2)
        for i, (w, h) in enumerate(SOURCES)
    }


def images_per_s(data: bytes, resolution: int, preprocess: str, repeat: int, n: int = 4) -> float:
    """Images per CPU-second of this thread (best of `repeat`): decode and resize run on the calling thread, and
    thread time does not count the waits a shared machine adds to the wall clock."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        for _ in range(n):
            decode_image(data, resolution, preprocess=preprocess)
        best = min(best, time.thread_time() - t0)
    return n / best


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@torch.no_grad()
def latent_mean(vae: AutoencoderKL, pixels: np.ndarray) -> torch.Tensor:
    x = torch.tensor(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    return vae.encode(x).latent_dist.mean[0]


def run(resolutions: tuple[int, ...], repeat: int, vae: AutoencoderKL) -> dict:
    """Rates per (resolution, source, mode), the mix rate per mode, and the fast path's deviation per source."""
    torch.set_num_threads(1)
    srcs = sources()
    out: dict = {"rates": {}, "mix": {}, "deviation": {}}
    for r in resolutions:
        for mode, preprocess in MODES.items():
            rates = {name: images_per_s(data, r, preprocess, repeat) for name, data in srcs.items()}
            out["rates"][(r, mode)] = rates
            out["mix"][(r, mode)] = len(rates) / sum(
                1 / v for v in rates.values()
            )  # equal parts of each size
        for name, data in srcs.items():
            fast, official = (decode_image(data, r, preprocess=p)[0] for p in ("fast", "official"))
            ref = latent_mean(vae, official)
            rel = float((latent_mean(vae, fast) - ref).norm() / ref.norm())
            diff = int(np.abs(fast.astype(np.int16) - official.astype(np.int16)).max())
            out["deviation"][(r, name)] = {"psnr": psnr(fast, official), "max_abs": diff, "latent_rel": rel}
    return out


def cores_per_gpu(decodes_per_core_s: float, resolution: int) -> dict[str, tuple[float, float]]:
    """GPU name → (VAE images/s at the assumed MFU, CPU cores to decode for it)."""
    result = {}
    for gpu, tflops in GPUS.items():
        vae_rate = tflops * 1e12 * ASSUMED_MFU / (VAE_GFLOP[resolution] * 1e9)
        result[gpu] = (vae_rate, vae_rate / VAE_IMAGES_PER_DECODE / decodes_per_core_s)
    return result


def section(result: dict, resolutions: tuple[int, ...], repeat: int) -> str:
    names = list(sources())
    rate_rows = []
    for r in resolutions:
        before, after = (result["rates"][(r, m)] for m in MODES)
        for name in names:
            rate_rows.append(
                [r, name, f"{before[name]:,.0f}", f"{after[name]:,.0f}", f"{after[name] / before[name]:.2f}"]
            )
        b, a = (result["mix"][(r, m)] for m in MODES)
        rate_rows.append([r, "**mix (equal parts)**", f"**{b:,.0f}**", f"**{a:,.0f}**", f"**{a / b:.2f}**"])
    dev_rows = []
    for r in resolutions:
        devs = [result["deviation"][(r, n)] for n in names]
        dev_rows.append(
            [
                r,
                f"{statistics.median(d['psnr'] for d in devs):.1f}",
                f"{min(d['psnr'] for d in devs):.1f}",
                max(d["max_abs"] for d in devs),
                f"{statistics.median(d['latent_rel'] for d in devs):.3f}",
                f"{max(d['latent_rel'] for d in devs):.3f}",
            ]
        )
    measured_gpu, measured = measured_vae_rates()
    core_rows = []
    for r in resolutions:
        after = result["mix"][(r, "after (official)")]
        if r in measured:
            decodes = measured[r] / VAE_IMAGES_PER_DECODE
            cells = [
                f"{measured_gpu} (measured)",
                f"{measured[r]:,.1f}",
                f"{decodes:,.0f}",
                f"{decodes / after:.1f}",
            ]
            core_rows.append([r, *(f"**{c}**" for c in cells)])
        for gpu, (vae_rate, cores) in cores_per_gpu(after, r).items():
            core_rows.append(
                [r, gpu, f"{vae_rate:,.0f}", f"{vae_rate / VAE_IMAGES_PER_DECODE:,.0f}", f"{cores:.1f}"]
            )
    source = (
        f"The {measured_gpu} rows are measured (`make bench-gpu`, BENCHMARKS_GPU.md); the others assume"
        if measured
        else "Assumed GPU throughput:"
    )
    return (
        "### Decode + resize + center crop per core: official path vs the fast path it replaced\n\n"
        f"`python -m bench.decode_resize --resolution {' '.join(map(str, resolutions))} --repeat {repeat}` — "
        "`stages.decode_images.decode_image` on textured JPEGs (quality 90, 4:2:0), one thread, images per "
        "CPU-second of that thread (thread time, so other load on the machine does not count), best of repeats. *before*: `--preprocess fast` (the old default: JPEG decoded at the smallest DCT scale ≥ the "
        "resized size, only the crop box resized). *after*: the default `--preprocess official` (full-size "
        "decode, bilinear resize of the whole image, crop), equal to torchvision bit for bit. Mix = harmonic "
        "mean over the six sizes.\n\n"
        + table(["R", "source w×h", "before images/s", "after images/s", "after / before"], rate_rows)
        + "\n\n#### How far the fast path is from the official pixels\n\n"
        "Same images; PSNR and max |difference| of the uint8 crops, and the relative L2 error "
        "‖E(fast) − E(official)‖ / ‖E(official)‖ of the posterior mean under the tiny random-init SD1.5 VAE "
        "(`embedded/tiny_models.py`; the real VAE's weights are not reachable here).\n\n"
        + table(
            [
                "R",
                "PSNR median (dB)",
                "PSNR min (dB)",
                "max abs diff",
                "latent rel err median",
                "latent rel err max",
            ],
            dev_rows,
        )
        + "\n\n#### CPU cores per GPU to keep the VAE busy (official path)\n\n"
        f"VAE encoder FLOPs per image counted by torch's FlopCounterMode on the SD VAE architecture: "
        f"{VAE_GFLOP[512]:,.0f} GFLOP at 512² (1,082 outside the mid-block attention) and {VAE_GFLOP[1024]:,.0f} "
        f"at 1024². {source} NVIDIA's dense BF16 datasheet peaks (H100 SXM5 989.4 TFLOP/s, A100 "
        f"312 TFLOP/s) at {ASSUMED_MFU:.0%} MFU, an assumption (`make bench-gpu` measures the VAE's real rate "
        "and MFU). Each decoded image feeds two VAE images (plain "
        "and flipped), so cores = VAE images/s ÷ 2 ÷ the *after* mix rate per core. Parquet reading, Ray and "
        "tar writing come on top; the decode dominates.\n\n"
        + table(["R", "GPU", "VAE images/s", "decodes/s needed", "CPU cores per GPU"], core_rows)
    )


def tiny_vae(work: Path) -> AutoencoderKL:
    from embedded.tiny_models import build_tiny_model

    model = work / "tiny-sd15"
    if not (model / "vae").is_dir():
        build_tiny_model("sd15", model, seed=0)
    return AutoencoderKL.from_pretrained(model, subfolder="vae").eval()


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--resolution",
        type=int,
        nargs="+",
        default=[512, 1024],
        choices=sorted(VAE_GFLOP),
        help="training resolutions R to measure (default: 512 1024)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed repeats per case, best kept (default: 3)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    resolutions = tuple(args.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(resolutions, args.repeat, tiny_vae(Path(tmp)))
    print(section(result, resolutions, args.repeat))


if __name__ == "__main__":
    main()
