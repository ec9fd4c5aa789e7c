"""Tiny random-init SD1.5 / SDXL checkpoints in the diffusers folder layout.

Why: there is no model hub here, yet every stage must load models through the same `from_pretrained` code path as a
real checkpoint. These folders are real pipelines (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/; SDXL adds text_encoder_2/, tokenizer_2/), only with tiny widths: 8x VAE downsampling and 4 latent
channels as in SD, so 64 px images give 4x8x8 latents.

The tokenizer is a genuine CLIP byte-level BPE (vocab.json + merges.txt written here): all 256 byte symbols, their
`</w>` forms, the two specials, plus one whole-word token per word of the synthetic captions (built with merge
chains), so synthetic captions tokenize to words and any other text still tokenizes, to characters.

CLI: python -m embedded.tiny_models --out models [--family sd15|sdxl|all] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from embedded.synthetic import COLOURS, OBJECTS, render_image, vocabulary
from schemas.atomic import publish_dir

FAMILIES = ("sd15", "sdxl")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
TEXT_HIDDEN = 32  # SD1.5 encoder and SDXL encoder 1
TEXT_HIDDEN_2 = 64  # SDXL encoder 2
POOLED_DIM = 32  # SDXL encoder 2 projection
TIME_EMBED_DIM = 8  # SDXL addition_time_embed_dim; 6 time ids
SCALING_FACTOR = {"sd15": 0.18215, "sdxl": 0.13025}
POSTERIOR_STD = 0.1  # of scaled latents, next to their unit std


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte → printable-character table (the byte-level alphabet of the BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges lowest rank first, exactly as the BPE model does, to check what a word becomes."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(itertools.pairwise(symbols))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def clip_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte alphabet + whole-word tokens. A merge is added only when a word is not yet one token, at the lowest
    priority, so it can never change how an earlier word merges."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    byte_map = bytes_to_unicode()
    for word in words:
        chars = [byte_map[b] for b in word.lower().encode("utf-8")]
        symbols = [*chars[:-1], chars[-1] + "</w>"]
        while len(parts := _bpe(symbols, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def write_tokenizer(out: Path, pad_token: str) -> int:
    """Write vocab.json, merges.txt and tokenizer_config.json; returns the vocabulary size."""
    vocab, merges = clip_vocab_and_merges(vocabulary())
    out.mkdir(parents=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


def text_config(vocab_size: int, hidden: int, projection_dim: int = 512) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _calibration_images(seed: int, n: int = 32) -> torch.Tensor:
    """Synthetic images at 64 px in [-1, 1], the kind of input the tiny VAE will see."""
    rng = random.Random(seed)
    images = []
    for _ in range(n):
        colour = rng.choice(list(COLOURS))
        jpeg = render_image(rng, rng.choice(OBJECTS), colour, colour, washed_out=rng.random() < 0.25).jpeg
        pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").resize((64, 64)), dtype=np.float32)
        images.append(torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(images)


@torch.no_grad()
def calibrate_vae(vae: AutoencoderKL, seed: int) -> None:
    """Give the random-init VAE the latent statistics of a trained SD VAE, which the noise schedule assumes.

    Random init yields posterior means of std ~0.3 (scaled: ~0.05, buried under unit noise at almost every
    timestep) and posterior std ~1. A real SD VAE yields means of std ~1/scaling_factor, so scaled latents have unit
    std, and a posterior std far below that. The mean and logvar rows of quant_conv are rescaled to match on
    synthetic images; the decoder stays random.
    """
    c = vae.config.latent_channels
    dist = vae.encode(_calibration_images(seed)).latent_dist
    per_channel_mean = dist.mean.mean(dim=(0, 2, 3))
    factor = 1.0 / (vae.config.scaling_factor * dist.mean.std().item())
    # the last convolution before the posterior: quant_conv, or the encoder's own (SD3/FLUX VAEs have none)
    moments = vae.quant_conv if vae.config.use_quant_conv else vae.encoder.conv_out
    # the flow VAEs' latents are (z - shift) * scale: centre the means on the shift
    shift = vae.config.shift_factor or 0.0
    moments.weight[:c] *= factor
    moments.bias[:c] = (moments.bias[:c] - per_channel_mean) * factor + shift
    target_logvar = 2 * math.log(POSTERIOR_STD / vae.config.scaling_factor)
    moments.bias[c:] += target_logvar - dist.logvar.mean().item()


def _vae(family: str, seed: int) -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=64,
        layers_per_block=1,
        norm_num_groups=8,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=SCALING_FACTOR[family],
        force_upcast=family == "sdxl",
    )
    calibrate_vae(vae, seed)
    return vae


def _unet(family: str) -> UNet2DConditionModel:
    sdxl = family == "sdxl"
    extra = (
        dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM,
        )
        if sdxl
        else {}
    )
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN + TEXT_HIDDEN_2 if sdxl else TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
        **extra,
    )


def _scheduler() -> DDPMScheduler:
    """The SD training scheduler config (scaled_linear 0.00085-0.012, 1000 steps, epsilon)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def _assemble(family: str, tmp: Path, seed: int) -> None:
    """Save each component as its own subfolder, then the pipeline's model_index.json from the loaded parts."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    vocab_size = write_tokenizer(tmp / "tokenizer", pad_token=EOS)
    torch.manual_seed(seed)
    parts = {
        "vae": _vae(family, seed),
        "text_encoder": CLIPTextModel(text_config(vocab_size, TEXT_HIDDEN)),
        "unet": _unet(family),
        "scheduler": _scheduler(),
        "tokenizer": CLIPTokenizer.from_pretrained(tmp / "tokenizer"),
    }
    if family == "sd15":
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    else:
        write_tokenizer(tmp / "tokenizer_2", pad_token="!")  # SDXL's second tokenizer pads with "!"
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(tmp / "tokenizer_2")
        parts["text_encoder_2"] = CLIPTextModelWithProjection(
            text_config(vocab_size, TEXT_HIDDEN_2, POOLED_DIM)
        )
        pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    pipe.save_pretrained(tmp)
    # save_pretrained rewrites the tokenizers as tokenizer.json; put back the plain vocab.json + merges.txt that
    # SD checkpoints ship, which every transformers version reads.
    shutil.rmtree(tmp / "tokenizer")
    write_tokenizer(tmp / "tokenizer", pad_token=EOS)
    if family == "sdxl":
        shutil.rmtree(tmp / "tokenizer_2")
        write_tokenizer(tmp / "tokenizer_2", pad_token="!")


def build_tiny_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Build `out_dir` (e.g. models/tiny-sd15) atomically; an existing folder is kept as is."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        print(f"tiny_models: {out_dir} exists, skipping")
        return out_dir
    if out_dir.exists():
        raise FileExistsError(
            f"{out_dir}: exists but has no model_index.json; remove it or pick another --out"
        )
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from a killed run
    tmp.parent.mkdir(parents=True, exist_ok=True)
    _assemble(family, tmp, seed)
    publish_dir(tmp, out_dir)
    return out_dir


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="parent folder; models go to OUT/tiny-<family>"
    )
    parser.add_argument(
        "--family", choices=[*FAMILIES, "all"], default="all", help="which model to build (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for family in FAMILIES if args.family == "all" else (args.family,):
        t0 = time.perf_counter()
        try:
            path = build_tiny_model(family, args.out / f"tiny-{family}", seed=args.seed)
        except FileExistsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        print(f"tiny_models: {path} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
