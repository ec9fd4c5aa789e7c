"""Tiny random-init Stable Diffusion 3 and FLUX.1 folders in the diffusers layout (the flow-matching families).

Why: as for SD1.5/SDXL (embedded/tiny_models.py), every stage must load them through the same `from_pretrained`
paths as real checkpoints, and no hub is reachable. These are real pipelines (model_index.json, transformer/, vae/,
scheduler/, the CLIP text encoders and tokenizers, T5 in text_encoder_3 (SD3) or text_encoder_2 (FLUX)) with tiny
widths: a 16-channel VAE downsampling 8x (64 px → 16x8x8 latents) with each family's published scaling and shift,
SD3.5's dual attention and RMS q/k norm, FLUX's guidance embedding and 2x2 latent packing, and the families'
scheduler configs. T5's tokenizer is a genuine SentencePiece-style Unigram `tokenizer.json` built here, with a piece
for every word of the synthetic captions and the single characters, so any text tokenizes.

`Size` sets every width and depth: tests build folders of other sizes than `make models` does, so nothing may
depend on the project's own numbers.

CLI: python -m embedded.tiny_flow --out models/.init --family sd3|flux [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

from embedded.synthetic import vocabulary
from embedded.tiny_models import EOS, calibrate_vae, text_config, write_tokenizer
from schemas.atomic import publish_dir

FLOW_FAMILIES = ("sd3", "flux")
# (scaling_factor, shift_factor) of the published VAEs: stabilityai/stable-diffusion-3.5-medium vae/config.json,
# black-forest-labs/FLUX.1-dev vae/config.json
VAE_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
LATENT_CHANNELS = 16


@dataclass(frozen=True)
class Size:
    """Every width, depth and vocabulary choice of a tiny flow model."""

    clip_hidden: int = 32  # CLIP-L (and SD3's first encoder)
    clip_hidden_2: int = 64  # SD3's CLIP-G
    t5_hidden: int = 128  # T5, the transformer's joint_attention_dim (>= the CLIP widths SD3 pads to it)
    t5_layers: int = 2
    layers: int = 2  # SD3 joint blocks; FLUX double-stream blocks
    single_layers: int = 1  # FLUX single-stream blocks
    heads: int = 2
    head_dim: int = 16
    extra_words: tuple[str, ...] = ()  # more vocabulary, so a test can give a folder another vocabulary size


def t5_tokenizer(out: Path, words: list[str]) -> int:
    """A T5 tokenizer (SentencePiece-style Unigram over "▁word" pieces and single characters, specials as T5's:
    pad 0, eos 1, unk 2) saved as tokenizer.json; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    characters = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in sorted(set(words))]
    pieces += [(c, -5.0) for c in characters] + [(f"▁{c}", -4.0) for c in characters]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Strip(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = T5TokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )
    fast.model_max_length = 512
    fast.save_pretrained(out)
    return len(pieces)


def _t5(vocab_size: int, size: Size) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=size.t5_hidden,
            d_kv=size.t5_hidden // 4,
            d_ff=2 * size.t5_hidden,
            num_layers=size.t5_layers,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _vae(family: str, seed: int) -> AutoencoderKL:
    scaling, shift = VAE_FACTORS[family]
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        sample_size=64,
        layers_per_block=1,
        norm_num_groups=8,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    calibrate_vae(vae, seed)
    return vae


def _sd3_parts(tmp: Path, size: Size, words: list[str]) -> dict:
    from diffusers import SD3Transformer2DModel

    vocab = write_tokenizer(tmp / "tokenizer", pad_token=EOS)
    write_tokenizer(tmp / "tokenizer_2", pad_token="!")
    t5_vocab = t5_tokenizer(tmp / "tokenizer_3", words)
    return {
        "transformer": SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=size.layers,
            attention_head_dim=size.head_dim,
            num_attention_heads=size.heads,
            joint_attention_dim=size.t5_hidden,
            caption_projection_dim=size.heads * size.head_dim,
            pooled_projection_dim=size.clip_hidden + size.clip_hidden_2,
            pos_embed_max_size=16,
            # SD3.5's architecture: dual attention in the first blocks, RMS-normalised q and k
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "text_encoder": CLIPTextModelWithProjection(text_config(vocab, size.clip_hidden, size.clip_hidden)),
        "tokenizer": CLIPTokenizer.from_pretrained(tmp / "tokenizer"),
        "text_encoder_2": CLIPTextModelWithProjection(
            text_config(vocab, size.clip_hidden_2, size.clip_hidden_2)
        ),
        "tokenizer_2": CLIPTokenizer.from_pretrained(tmp / "tokenizer_2"),
        "text_encoder_3": _t5(t5_vocab, size),
        "tokenizer_3": _loaded_t5_tokenizer(tmp / "tokenizer_3"),
    }


def _flux_parts(tmp: Path, size: Size, words: list[str]) -> dict:
    from diffusers import FluxTransformer2DModel

    vocab = write_tokenizer(tmp / "tokenizer", pad_token=EOS)
    t5_vocab = t5_tokenizer(tmp / "tokenizer_2", words)
    # rotary axes (id, row, column) summing to the head dim, as FLUX.1's (16, 56, 56) sum to 128
    ids_axis = size.head_dim // 4
    row_axis = (size.head_dim - ids_axis) // 2
    return {
        "transformer": FluxTransformer2DModel(
            patch_size=1,
            # 2x2 patches of the 16-channel latent
            in_channels=4 * LATENT_CHANNELS,
            num_layers=size.layers,
            num_single_layers=size.single_layers,
            attention_head_dim=size.head_dim,
            num_attention_heads=size.heads,
            joint_attention_dim=size.t5_hidden,
            # CLIP-L's pooled output (its hidden width), as FluxPipeline.encode_prompt returns it
            pooled_projection_dim=size.clip_hidden,
            guidance_embeds=True,
            axes_dims_rope=(ids_axis, row_axis, size.head_dim - ids_axis - row_axis),
        ),
        # FLUX.1-dev's scheduler config: resolution-dependent shift at inference, unshifted sigmas in training
        "scheduler": FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        "text_encoder": CLIPTextModel(text_config(vocab, size.clip_hidden, size.clip_hidden)),
        "tokenizer": CLIPTokenizer.from_pretrained(tmp / "tokenizer"),
        "text_encoder_2": _t5(t5_vocab, size),
        "tokenizer_2": _loaded_t5_tokenizer(tmp / "tokenizer_2"),
    }


def _loaded_t5_tokenizer(folder: Path):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(folder)


def build_tiny_flow_model(family: str, out_dir: Path, seed: int = 0, size: Size = Size()) -> Path:
    """Build `out_dir` (e.g. models/.init/tiny-flux) atomically; an existing folder is kept as is."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if family not in FLOW_FAMILIES:
        raise ValueError(f"family must be one of {FLOW_FAMILIES}, got {family!r}")
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        return out_dir
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(seed)
    words = [*vocabulary(), *size.extra_words]
    parts = (_sd3_parts if family == "sd3" else _flux_parts)(tmp, size, words)
    parts["vae"] = _vae(family, seed)
    pipeline = StableDiffusion3Pipeline(**parts) if family == "sd3" else FluxPipeline(**parts)
    pipeline.save_pretrained(tmp)
    publish_dir(tmp, out_dir)
    return out_dir


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="parent folder; models go to OUT/tiny-<family>"
    )
    parser.add_argument("--family", choices=FLOW_FAMILIES, required=True, help="which model to build")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    path = build_tiny_flow_model(args.family, args.out / f"tiny-{args.family}", seed=args.seed)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"tiny_flow: {path} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
