"""What the encode stores = what the official recipe computes, and the two halves joined on real encode output.

Pick-a-Pic-shaped rows built from the textured image zoo (tests/fixtures/image_zoo.py) go through the real
`stages.encode` CLI on the session's Ray cluster, for tiny SD1.5 and SDXL. Every stored moment is compared with
`vae.encode(x).latent_dist.mean/logvar` of the tensor torchvision's train_transforms produce from the same bytes
(Resize → CenterCrop → flip or not → ToTensor → Normalize), as DiffusionDPO's train.py does at every step: equal
within fp16 rounding. The same output then feeds the trainer's stream, a training step and `trainer.evaluate`.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from schemas.manifest import Manifest
from schemas.sample import PairMeta, decode_tensors
from stages.decode_images import decode_pairs
from stages.encode_latents import LatentEncoder
from stages.formats import CANONICAL_SCHEMA
from tests.fixtures.image_zoo import official_tensor
from tests.fixtures.zoo_encodes import R
from tests.test_train import assert_scores_the_export
from trainer.data import LatentPairStream
from trainer.train import main as train_main


@pytest.fixture(scope="module")
def encoded(zoo_encode, tiny_sd15: Path, tiny_sdxl: Path, tiny_sd3: Path, tiny_flux: Path) -> dict[str, Path]:
    models = {"sd15": tiny_sd15, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}
    return {family: zoo_encode(model) for family, model in models.items()}


def stored_pairs(out: Path) -> list[tuple[PairMeta, dict[str, torch.Tensor]]]:
    manifest = Manifest.load(out)
    pairs = []
    for entry in manifest.shards:
        with tarfile.open(out / entry.path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in sorted(members.items()):
            if name.endswith(".json"):
                tensors = members[name.removesuffix(".json") + ".safetensors"]
                pairs.append((PairMeta.from_json_bytes(data), decode_tensors(tensors, [], name)))
    return pairs


@torch.no_grad()
def official_moments(vae: AutoencoderKL, data: bytes, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dist = vae.encode(official_tensor(data, R, flip=flip)[None]).latent_dist
    return dist.mean[0], dist.logvar[0]


def fp16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of fp16 values around x (2^-24 in the subnormal range)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-14)))
    return torch.pow(2.0, exponent - 10)


def deviations(
    pairs: list[tuple[PairMeta, dict[str, torch.Tensor]]], model: Path, rows: dict[int, dict]
) -> dict[str, float]:
    """Over all stored tensors, per part (mean, logvar): the largest relative L2 error against the official moments,
    and the largest |stored − official| beyond one fp16 ulp of the official value, in units of the tensor's RMS.

    Rounding to fp16 moves a value by at most half an ulp of itself. The encode's fp32 VAE pass differs from the
    oracle's by float noise (batched convolutions; x/127.5 − 1 against torchvision's (x/255 − 0.5)/0.5), which
    shows only near zero, where the fp16 grid is finer than that noise: measured ≤ 7e-4 of the RMS.
    """
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval()
    worst: dict[str, float] = {}
    assert len(pairs) == len(rows)
    for meta, tensors in pairs:
        row = rows[meta.ranking_id]
        preferred, other = ("jpg_0", "jpg_1") if row["label_0"] == 1.0 else ("jpg_1", "jpg_0")
        for side, column in (("w", preferred), ("l", other)):
            for flip in (False, True):
                mean, logvar = official_moments(vae, row[column], flip)
                for part, ref in (("mean", mean), ("logvar", logvar)):
                    name = f"{side}_{part}{'_flip' if flip else ''}"
                    got = torch.as_tensor(tensors[name]).float()
                    rms = ref.pow(2).mean().sqrt()
                    excess = float(((got - ref).abs() - fp16_ulp(ref)).clamp_min(0).max() / rms)
                    rel = float((got - ref).norm() / ref.norm())
                    worst[f"{part} excess"] = max(worst.get(f"{part} excess", 0.0), excess)
                    worst[f"{part} rel"] = max(worst.get(f"{part} rel", 0.0), rel)
    return worst


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_stored_moments_equal_the_official_recipe_within_fp16_rounding(
    family: str, encoded: dict[str, Path], zoo_parquet, request: pytest.FixtureRequest
) -> None:
    """Also the manifest's factors: what the trainer scales by is what diffusers' own AutoencoderKL config says
    (the flow families' 16-channel VAEs shift as well as scale)."""
    model = request.getfixturevalue(f"tiny_{family}")
    config = AutoencoderKL.from_pretrained(model, subfolder="vae").config
    manifest = Manifest.load(encoded[family])
    assert manifest.vae_scaling_factor == config.scaling_factor
    assert manifest.vae_shift_factor == config.shift_factor
    assert manifest.latent_shape == [config.latent_channels, R // 8, R // 8]
    worst = deviations(stored_pairs(encoded[family]), model, zoo_parquet[1])
    assert max(worst["mean excess"], worst["logvar excess"]) < 2.0**-9, worst  # ≈ 2e-3 of the RMS
    assert max(worst["mean rel"], worst["logvar rel"]) < 1e-3, worst  # fp16 rounding alone: ≤ 4.9e-4


def test_the_tolerance_catches_the_fast_path(zoo_parquet, tiny_sd15: Path) -> None:
    """The same comparison on the opt-in fast path's moments (the old default) fails by orders of magnitude."""
    _, rows = zoo_parquet
    batch = {k: np.array([row[k] for row in rows.values()], dtype=object) for k in CANONICAL_SCHEMA.names}
    batch["label_0"] = batch["label_0"].astype(np.float64)
    moments = LatentEncoder(str(tiny_sd15), device="cpu")(
        decode_pairs(batch, resolution=R, preprocess="fast")
    )
    pairs = [
        (PairMeta.from_json_bytes(meta), {k: v[i] for k, v in moments.items() if k.startswith(("w_", "l_"))})
        for i, meta in enumerate(moments["json"])
    ]
    worst = deviations(pairs, tiny_sd15, rows)
    assert worst["mean rel"] > 0.05 and worst["mean excess"] > 0.1, worst


def test_encode_output_trains_and_evaluates(
    encoded: dict[str, Path], tiny_sdxl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real encode output → the trainer's stream → two DPO steps (constant time ids) → `trainer.evaluate`."""
    data = encoded["sdxl"]
    stream = LatentPairStream(data, batch_size=2, seed=0)
    batch = next(iter(stream))
    assert batch["w_latents"].shape == (2, *Manifest.load(data).latent_shape)
    assert batch["w_time_ids"].shape == (2, 6) and torch.isfinite(batch["w_latents"]).all()
    args = ["--data", str(data), "--model", str(tiny_sdxl), "--output-dir", str(tmp_path / "run")]
    args += ["--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-3", "--no-scale-lr"]
    args += ["--lr-warmup-steps", "0", "--num-workers", "0", "--checkpoint-every", "0", "--report-to", "none"]
    args += ["--val-data", str(data), "--eval-max-pairs", "6", "--eval-draws", "1"]
    assert train_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["global_step"] == 2 and summary["eval_num_pairs"] == 6
    trained = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "final" / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters(), strict=True))
    held_out = {k.removeprefix("eval_"): v for k, v in summary.items() if k.startswith("eval_")}
    assert_scores_the_export(held_out, tiny_sdxl, tmp_path / "run", data, batch_size=4, max_pairs=6, draws=1)
