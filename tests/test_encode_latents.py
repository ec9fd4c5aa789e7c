"""The VAE stage class run bare (no Ray): cached flips are encodings of flipped pixels, not flipped latents."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from embedded.synthetic import OBJECTS, render_image
from stages.encode_latents import LatentEncoder, flip_equivariance_gap


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        jpeg = render_image(rng, rng.choice(OBJECTS), "red", "red", False).jpeg
        out.append(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").resize((64, 64))))
    return np.stack(out)


def _rel(stored: np.ndarray, expected: torch.Tensor) -> float:
    """fp16 storage and batch-dependent fp32 summation order allow ~1e-3, far below the flip gap."""
    return float((torch.from_numpy(stored).float() - expected).norm() / expected.norm())


def test_flipped_variants_are_encodings_of_flipped_pixels(tiny_sd15: Path) -> None:
    encoder = LatentEncoder(str(tiny_sd15), device="cpu")
    w, other = _images(3, seed=0), _images(3, seed=1)
    out = encoder({"w": w, "l": other, "ranking_id": np.arange(3)})
    assert out["ranking_id"].tolist() == [0, 1, 2]
    expected_mean, expected_logvar = encoder.moments(torch.from_numpy(w).flip(2))
    assert _rel(out["w_mean_flip"], expected_mean) < 2e-3
    assert _rel(out["w_logvar_flip"], expected_logvar) < 2e-3
    assert _rel(out["l_mean"], encoder.moments(torch.from_numpy(other))[0]) < 2e-3
    # Why the flips are encoded: the conv VAE is not flip-equivariant, so flipping the latent would be a different
    # (and wrong) training sample. bench/run.py reports the same gap.
    assert flip_equivariance_gap(encoder, torch.from_numpy(w)) > 0.05


def test_mean_mode_without_flips_stores_only_means(tiny_sd15: Path) -> None:
    encoder = LatentEncoder(str(tiny_sd15), device="cpu", flip=False, latent_mode="mean")
    out = encoder({"w": _images(2), "l": _images(2, seed=3)})
    assert sorted(out) == ["l_mean", "w_mean"] and out["w_mean"].dtype == np.float16


def test_the_driver_imports_the_model_stages_without_diffusers_or_transformers() -> None:
    """The encode driver imports these modules only to hand their classes to Ray: diffusers and transformers (about
    5 s of CPU each here) are imported in the actors, not once more in the driver before every text and pair job."""
    probe = (
        "import sys, stages.encode_latents, stages.encode_text; "
        "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"
