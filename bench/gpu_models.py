"""The published SD1.5 / SDXL architectures at random init, in the diffusers folder layout, for bench/gpu.py.

Why random init: step time, memory and MFU depend on the architecture, not the weights, and no hub is reachable
from a lent GPU machine. Tokenizers and the scheduler come from the project's tiny model, so every figure goes
through the same `from_pretrained` paths as a real checkpoint. tests/test_bench.py checks the parameter counts
against the published ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from embedded.tiny_models import build_tiny_model
from schemas.atomic import apply_umask

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
    apply_umask(out)
    (out / ".built").touch()
    return out


# The flow-matching transformers as published (transformer/config.json of stabilityai/stable-diffusion-3.5-medium
# and black-forest-labs/FLUX.1-dev), their 16-channel VAE and T5-XXL's encoder.
SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLOW_VAE = dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
)
