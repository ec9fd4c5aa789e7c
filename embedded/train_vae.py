"""Train a tiny model's VAE on synthetic images, so that its latents decode back to images.

Why: the tiny models' VAEs are random (embedded/tiny_models.py only calibrates their latent statistics), so a
generated latent decodes to noise and no sample can be judged. A real base model's VAE was trained on images before
its denoiser was trained on the latents; this does the same on the pretraining synthetic set (never a preference set
of the demo): reconstruction (mean squared error) of the posterior samples of 64 px crops, decoded the way the encode
crops them (stages.decode_images), plus a small KL term, AdamW with a cosine decay, every draw from --seed. Then the latent space is
re-centred and re-scaled (`recalibrate`) so that scaled latents have unit std again, with the config's published
scaling (and shift) factor kept: the noise schedules assume it. The held-out images (the set's last --held-out
distinct images, never trained on) give the reconstruction PSNR of decoding the posterior mean, before and after.

The VAE is written back into MODEL/vae in the diffusers layout (save_pretrained, safetensors), published by rename,
with MODEL/vae/train_vae.json recording the settings and the PSNRs.

CLI: python -m embedded.train_vae --model MODEL --images PARQUET_DIR [--steps N] [--batch-size N] [--lr LR]
     [--kl-weight W] [--held-out N] [--max-images N] [--resolution R] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from schemas.atomic import publish_dir
from schemas.errors import InputError

REPORT_FILE = "train_vae.json"


@dataclass(frozen=True)
class VaeTraining:
    """Every setting of one training run (recorded beside the weights)."""

    steps: int = 500
    batch_size: int = 32
    lr: float = 2e-3
    kl_weight: float = 1e-6
    held_out: int = 256
    max_images: int = 3000
    resolution: int = 64
    seed: int = 0


def read_images(folder: Path, resolution: int, limit: int) -> torch.Tensor:
    """The distinct images (by uid) of a Pick-a-Pic parquet folder, in file and row order, cropped as the encode
    crops them: float [N, 3, R, R] in [-1, 1]."""
    from stages.decode_images import decode_image

    files = sorted(Path(folder).glob("*.parquet"))
    if not files:
        raise InputError(f"--images {folder}: no *.parquet files")
    seen: set[str] = set()
    crops = []
    for file in files:
        table = pq.read_table(file, columns=["image_0_uid", "jpg_0", "image_1_uid", "jpg_1"]).to_pydict()
        for side in ("0", "1"):
            for uid, jpeg in zip(table[f"image_{side}_uid"], table[f"jpg_{side}"], strict=True):
                if uid not in seen and len(crops) < limit:
                    seen.add(uid)
                    crops.append(decode_image(jpeg, resolution)[0])
    pixels = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1


def psnr(vae, images: torch.Tensor, batch_size: int = 64) -> float:
    """Reconstruction PSNR in dB of decoding the posterior mean, over images in [-1, 1] (peak-to-peak 2)."""
    errors = []
    with torch.no_grad():
        for batch in images.split(batch_size):
            decoded = vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1)
            errors.append(((decoded - batch) ** 2).flatten(1).mean(1))
    return float(10 * math.log10(4 / torch.cat(errors).mean().item()))


def _moments_conv(vae) -> torch.nn.Conv2d:
    """The last convolution before the posterior: quant_conv, or the encoder's own (SD3/FLUX VAEs have none)."""
    return vae.quant_conv if vae.config.use_quant_conv else vae.encoder.conv_out


def _latent_conv(vae) -> torch.nn.Conv2d:
    """The first convolution after the latent: post_quant_conv, or the decoder's own."""
    return vae.post_quant_conv if vae.config.use_post_quant_conv else vae.decoder.conv_in


@torch.no_grad()
def recalibrate(vae, images: torch.Tensor) -> dict[str, float]:
    """Map the latent space affinely, z' = a·(z − m) + shift (m per channel, one a), so that the scaled latents of
    `images` have unit std and mean 0, as tiny_models.calibrate_vae does at init; the decoder's first convolution
    takes the inverse map, so decoded images stay the same (exactly through a 1x1 post_quant_conv; through a
    decoder conv_in, whose zero padding is not remapped, up to the border pixels). Returns the scaled-latent
    statistics before."""
    c = vae.config.latent_channels
    dist = vae.encode(images).latent_dist
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    m = dist.mean.mean(dim=(0, 2, 3))
    # the std once centred per channel: what the map leaves of the latents' spread
    a = 1.0 / (scale * (dist.mean - m[None, :, None, None]).std().item())
    before = {
        "latent_std": scale * dist.mean.std().item(),
        "posterior_std": scale * dist.std.mean().item(),
    }
    encode, decode = _moments_conv(vae), _latent_conv(vae)
    encode.weight[:c] *= a
    encode.bias[:c] = (encode.bias[:c] - m) * a + shift
    # the posterior std scales with the mean: logvar + 2 log a
    encode.bias[c:] += 2 * math.log(a)
    # decode(z') must equal decode(z) for z = (z' - shift) / a + m
    offset = m - shift / a
    decode.bias += (decode.weight * offset[None, :, None, None]).sum(dim=(1, 2, 3))
    decode.weight /= a
    return before


def train(vae, images: torch.Tensor, settings: VaeTraining, log_every: int = 100) -> None:
    """AdamW with a cosine decay to 0 on reconstruction of posterior samples + kl_weight × KL(posterior ‖ N(0, I)),
    in place."""
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    vae.train()
    for step in range(1, settings.steps + 1):
        index = torch.randint(len(images), (settings.batch_size,), generator=generator)
        batch = images[index]
        # random horizontal flips, as the encode stores flipped views too
        flip = torch.rand(len(batch), generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        dist = vae.encode(batch).latent_dist
        latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
        reconstruction = ((vae.decode(latents).sample - batch) ** 2).mean()
        kl = dist.kl().mean() / dist.mean[0].numel()
        loss = reconstruction + settings.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == settings.steps:
            print(
                f"train_vae: step {step}/{settings.steps} mse {reconstruction.item():.5f} kl {kl.item():.3g}"
            )
    vae.eval()


def train_model_vae(model: Path, images_dir: Path, settings: VaeTraining) -> dict:
    """Train MODEL/vae on the images of `images_dir` and publish it in place; returns the report."""
    from diffusers import AutoencoderKL

    vae_dir = Path(model) / "vae"
    if not (vae_dir / "config.json").is_file():
        raise InputError(f"--model {model}: no vae/config.json (a diffusers pipeline folder)")
    if settings.resolution % 8 or settings.resolution < 8:
        raise InputError(f"--resolution {settings.resolution}: must be a positive multiple of 8")
    for name in ("steps", "batch_size", "held_out"):
        if getattr(settings, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(settings, name)}: must be at least 1")
    t0 = time.perf_counter()
    images = read_images(images_dir, settings.resolution, settings.max_images)
    print(f"train_vae: {len(images)} distinct images of {images_dir} in {time.perf_counter() - t0:.1f}s")
    if len(images) <= settings.held_out:
        raise InputError(
            f"--images {images_dir}: {len(images)} distinct images, not more than --held-out {settings.held_out}"
        )
    train_images, held_out = images[: -settings.held_out], images[-settings.held_out :]
    torch.manual_seed(settings.seed)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    t0 = time.perf_counter()
    initial = psnr(vae, held_out)
    train(vae, train_images, settings)
    trained = psnr(vae, held_out)
    before = recalibrate(vae, train_images[:512])
    report = {
        **asdict(settings),
        "train_images": len(train_images),
        "held_out_images": len(held_out),
        "psnr_db_before": round(initial, 2),
        "psnr_db_trained": round(trained, 2),
        "psnr_db": round(psnr(vae, held_out), 2),
        "scaled_latent_std_before_recalibration": round(before["latent_std"], 4),
        "scaled_posterior_std": round(before["posterior_std"] / before["latent_std"], 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    tmp = vae_dir.with_name(f".{vae_dir.name}.tmp")
    vae.save_pretrained(tmp, safe_serialization=True)
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    publish_dir(tmp, vae_dir)
    return report


def arguments() -> argparse.ArgumentParser:
    d = VaeTraining()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", type=Path, required=True, help="diffusers pipeline folder; MODEL/vae is replaced"
    )
    parser.add_argument(
        "--images",
        type=Path,
        required=True,
        help="Pick-a-Pic parquet folder (the pretraining set's train split)",
    )
    parser.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"images per step ({d.batch_size})"
    )
    parser.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default: {d.lr})")
    parser.add_argument(
        "--kl-weight", type=float, default=d.kl_weight, help=f"KL weight (default: {d.kl_weight})"
    )
    parser.add_argument(
        "--held-out", type=int, default=d.held_out, help=f"last distinct images kept for PSNR ({d.held_out})"
    )
    parser.add_argument(
        "--max-images", type=int, default=d.max_images, help=f"distinct images read (default: {d.max_images})"
    )
    parser.add_argument(
        "--resolution", type=int, default=d.resolution, help=f"crop size (default: {d.resolution})"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed of every draw (default: {d.seed})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    settings = VaeTraining(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        kl_weight=args.kl_weight,
        held_out=args.held_out,
        max_images=args.max_images,
        resolution=args.resolution,
        seed=args.seed,
    )
    try:
        report = train_model_vae(args.model, args.images, settings)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"train_vae: {args.model}/vae: held-out PSNR {report['psnr_db_before']:.2f} dB (random) → "
        f"{report['psnr_db']:.2f} dB on {report['held_out_images']} images, {report['seconds']:.0f}s"
    )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
