"""The tiny checkpoints load through the real `from_pretrained` paths and have SD1.5 / SDXL shapes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from embedded.synthetic import vocabulary
from embedded.tiny_models import build_tiny_model, main

torch.set_num_threads(2)


def _tokens(tokenizer: CLIPTokenizer, text: str) -> torch.Tensor:
    return tokenizer(
        text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_layout_size_and_tokenizer_files(family: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(f"tiny_{family}")
    index = json.loads((path / "model_index.json").read_text())
    expected = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    if family == "sdxl":
        expected |= {"text_encoder_2", "tokenizer_2"}
    assert expected <= {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
    assert {p.name for p in (path / "tokenizer").iterdir()} >= {
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
    }
    assert sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) < 5 * 2**20
    assert not list(path.parent.glob(".*")), "temporary build folder left behind"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tokenizer_gives_each_synthetic_word_one_token(family: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(f"tiny_{family}")
    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    assert tok.model_max_length == 77 and tok.pad_token == "<|endoftext|>"
    assert tok.tokenize("a red cube") == ["a</w>", "red</w>", "cube</w>"]
    for word in vocabulary():
        assert tok.tokenize(word) == [f"{word}</w>"], word
    ids = tok("a small red cube, studio lighting").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 2 + 7
    assert tok.decode(ids, skip_special_tokens=True) == "a small red cube , studio lighting"
    # text outside the vocabulary still tokenizes, character by character, without unknown tokens
    assert tok.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]
    if family == "sdxl":
        assert CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2").pad_token == "!"


def test_sd15_components_load_and_have_sd_shapes(tiny_sd15: Path) -> None:
    vae = AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae")
    assert vae.config.scaling_factor == 0.18215
    latents = vae.encode(torch.randn(2, 3, 64, 64)).latent_dist
    assert latents.mean.shape == (2, 4, 8, 8) and latents.logvar.shape == (2, 4, 8, 8)
    assert vae.encode(torch.randn(1, 3, 64, 96)).latent_dist.mean.shape == (1, 4, 8, 12)
    tok = CLIPTokenizer.from_pretrained(tiny_sd15, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder")
    embeds = text(_tokens(tok, "a red cube")).last_hidden_state
    assert embeds.shape == (1, 77, 32)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    out = unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=embeds).sample
    assert out.shape == (1, 4, 8, 8)
    sched = DDPMScheduler.from_pretrained(tiny_sd15, subfolder="scheduler")
    assert (sched.config.beta_schedule, sched.config.num_train_timesteps) == ("scaled_linear", 1000)
    assert (sched.config.beta_start, sched.config.beta_end, sched.config.prediction_type) == (
        0.00085,
        0.012,
        "epsilon",
    )


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_vae_latents_have_trained_sd_statistics(
    family: str, request: pytest.FixtureRequest, synthetic_parquet: Path
) -> None:
    """Scaled latents of about unit std (not ~0.05 as at random init), posterior noise well below that."""
    vae = AutoencoderKL.from_pretrained(request.getfixturevalue(f"tiny_{family}"), subfolder="vae")
    rows = pq.read_table(sorted((synthetic_parquet / "train").glob("*.parquet"))[0]).to_pylist()
    images = [
        Image.open(io.BytesIO(r[k])).convert("RGB").resize((64, 64)) for r in rows for k in ("jpg_0", "jpg_1")
    ]
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(
        0, 3, 1, 2
    )
    with torch.no_grad():
        dist = vae.encode(pixels / 127.5 - 1).latent_dist
    scale = vae.config.scaling_factor
    assert 0.5 < (dist.mean * scale).std().item() < 2.0
    assert (dist.mean * scale).mean().abs().item() < 0.3
    assert (dist.std * scale).mean().item() < 0.2


def test_sdxl_components_load_and_have_sdxl_shapes(tiny_sdxl: Path) -> None:
    assert AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae").config.scaling_factor == 0.13025
    tok1 = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer_2")
    enc1 = CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder")
    enc2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")
    out1 = enc1(_tokens(tok1, "a blue ball"), output_hidden_states=True)
    out2 = enc2(_tokens(tok2, "a blue ball"), output_hidden_states=True)
    embeds = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    pooled = out2.text_embeds
    assert embeds.shape == (1, 77, 96) and pooled.shape == (1, 32)
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    cond = {"text_embeds": pooled, "time_ids": time_ids}
    out = unet(
        torch.randn(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=embeds, added_cond_kwargs=cond
    )
    assert out.sample.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_whole_pipeline_loads_and_generates(family: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(f"tiny_{family}")
    cls = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(path)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    image = pipe("a red cube", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_same_seed_same_weights_and_existing_folder_is_kept(tmp_path: Path, tiny_sd15: Path) -> None:
    rebuilt = build_tiny_model("sd15", tmp_path / "tiny-sd15", seed=0)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (rebuilt / part).read_bytes() == (tiny_sd15 / part).read_bytes(), part
    stamp = (rebuilt / "unet" / "config.json").stat().st_mtime_ns
    build_tiny_model("sd15", rebuilt, seed=1)
    assert (rebuilt / "unet" / "config.json").stat().st_mtime_ns == stamp
    other = build_tiny_model("sd15", tmp_path / "other", seed=1)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (other / unet).read_bytes() != (rebuilt / unet).read_bytes()


def test_cli_names_folders_by_family_and_refuses_a_half_built_one(tmp_path: Path) -> None:
    (tmp_path / "tiny-sdxl").mkdir()
    assert main(["--out", str(tmp_path), "--family", "sdxl"]) == 2
    assert main(["--out", str(tmp_path), "--family", "sd15"]) == 0
    assert (tmp_path / "tiny-sd15" / "model_index.json").exists()
    with pytest.raises(ValueError, match="family"):
        build_tiny_model("sd3", tmp_path / "x")
