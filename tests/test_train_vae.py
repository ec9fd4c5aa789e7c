"""embedded.train_vae: the trained tiny VAE, loaded back through AutoencoderKL.from_pretrained, reconstructs held-out
synthetic images that a random-init VAE cannot, keeps the latent statistics the noise schedules assume, and is a
pure function of its seed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from embedded.train_vae import REPORT_FILE, VaeTraining, main, read_images, recalibrate, train_model_vae

torch.set_num_threads(2)

# 150 steps on the fixture's 145 images: 14.0 dB on this machine, far from make models' VAE, above a random one (11.0 dB)
SETTINGS = VaeTraining(steps=150, batch_size=16, lr=4e-3, held_out=16)
PSNR_THRESHOLD_DB = 13.0


def uint8_psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """PSNR by its definition, 10·log10(255² / MSE), over the 8-bit images the decoder's output rounds to, as a
    PNG of it would hold."""
    with torch.no_grad():
        decoded = vae.decode(vae.encode(images).latent_dist.mean).sample

    def to_uint8(x: torch.Tensor) -> np.ndarray:
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy().astype(np.float64)

    mse = np.mean((to_uint8(decoded) - to_uint8(images)) ** 2)
    return float(10 * np.log10(255**2 / mse))


@pytest.fixture(scope="module")
def trained(tiny_sd15: Path, synthetic_parquet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("train_vae") / "tiny-sd15"
    shutil.copytree(tiny_sd15, model)
    train_model_vae(model, synthetic_parquet / "train", SETTINGS)
    return model


def test_trained_vae_reconstructs_held_out_images(
    trained: Path, tiny_sd15: Path, synthetic_parquet: Path
) -> None:
    # the validation split: images the training never saw
    held_out = read_images(synthetic_parquet / "validation", 64, 64)
    random_vae = AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae")
    trained_vae = AutoencoderKL.from_pretrained(trained, subfolder="vae")
    assert (trained / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(trained.glob(".vae*")), "temporary folder left behind"
    random_psnr, trained_psnr = uint8_psnr(random_vae, held_out), uint8_psnr(trained_vae, held_out)
    assert random_psnr < PSNR_THRESHOLD_DB < trained_psnr, (random_psnr, trained_psnr)
    report = json.loads((trained / "vae" / REPORT_FILE).read_text())
    assert report["steps"] == SETTINGS.steps and report["psnr_db"] > PSNR_THRESHOLD_DB
    # the published scaling factor is kept and the scaled latents have unit std again, as at init
    assert trained_vae.config.scaling_factor == random_vae.config.scaling_factor
    latents = trained_vae.encode(held_out).latent_dist.mean * trained_vae.config.scaling_factor
    assert abs(latents.std().item() - 1) < 0.15 and latents.mean().abs().item() < 0.15


def test_recalibration_keeps_the_decoded_images(trained: Path, synthetic_parquet: Path) -> None:
    """The latent map and its inverse in post_quant_conv: decoding the re-centred, re-scaled posterior mean gives
    the image the unmapped one gave."""
    images = read_images(synthetic_parquet / "validation", 64, 16)
    vae = AutoencoderKL.from_pretrained(trained, subfolder="vae")
    with torch.no_grad():
        before = vae.decode(vae.encode(images).latent_dist.mean).sample
        # z → 3z + 0.5 in the encoder, its inverse in post_quant_conv: the recalibration has something to undo
        vae.quant_conv.weight[:4] *= 3
        vae.quant_conv.bias[:4] = vae.quant_conv.bias[:4] * 3 + 0.5
        vae.post_quant_conv.bias -= (vae.post_quant_conv.weight.sum(dim=(2, 3)) * 0.5 / 3).sum(1)
        vae.post_quant_conv.weight /= 3
        recalibrate(vae, images)
        after = vae.decode(vae.encode(images).latent_dist.mean).sample
        scaled = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert scaled.std().item() == pytest.approx(1.0, abs=1e-4)


def test_same_seed_same_bytes(tiny_sd15: Path, synthetic_parquet: Path, tmp_path: Path) -> None:
    settings = VaeTraining(steps=3, batch_size=4, held_out=8, max_images=40)
    weights = []
    for name in ("a", "b"):
        shutil.copytree(tiny_sd15, tmp_path / name)
        train_model_vae(tmp_path / name, synthetic_parquet / "train", settings)
        weights.append((tmp_path / name / "vae" / "diffusion_pytorch_model.safetensors").read_bytes())
    assert weights[0] == weights[1]
    assert weights[0] != (tiny_sd15 / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_cli_errors_name_the_flag(
    tmp_path: Path, synthetic_parquet: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["--model", str(tmp_path), "--images", str(synthetic_parquet / "train")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --model {tmp_path}: no vae/config.json")


def test_flow_vae_without_quant_convs(tiny_flux: Path, synthetic_parquet: Path, tmp_path: Path) -> None:
    """FLUX's 16-channel VAE has no quant convs: the map goes into encoder.conv_out and decoder.conv_in, whose zero
    padding it does not remap, so the images change a little at the border only."""
    model = tmp_path / "tiny-flux"
    shutil.copytree(tiny_flux, model)
    report = train_model_vae(
        model, synthetic_parquet / "train", VaeTraining(steps=20, batch_size=8, held_out=16)
    )
    assert abs(report["psnr_db"] - report["psnr_db_trained"]) < 0.5, report
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    images = read_images(synthetic_parquet / "train", 64, 64)
    with torch.no_grad():
        latents = (vae.encode(images).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(latents.std().item() - 1) < 0.15 and latents.mean().abs().item() < 0.15
