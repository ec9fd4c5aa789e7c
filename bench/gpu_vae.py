"""The encoder classes' rows of bench/gpu.py: VAE encode rate per setting with its error against fp32, the VAE's
batch invariance, and what the on-the-fly recipe adds to a cached step."""

from __future__ import annotations

import torch

from bench.gpu_harness import Bench, Setup, counted_flops, failure, seconds_per_call
from bench.gpu_step import release_device_memory
from stages.encode_latents import LatentEncoder
from stages.encode_text import CaptionEncoder


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
