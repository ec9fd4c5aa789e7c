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


def _decoded_batches(parquet_dir: Path, batch_rows: int) -> tuple[list[dict], set[str]]:
    """The decode stage's output over a synthetic split, in input order, and the split's unique image uids as
    Pick-a-Pic's own columns give them (the oracle: the encoder never sees the uids)."""
    import pyarrow.parquet as pq

    from stages.decode_images import decode_pairs

    table = pq.read_table(sorted(parquet_dir.glob("*.parquet")))
    columns = ("ranking_id", "caption", "jpg_0", "jpg_1", "label_0", "image_0_uid", "image_1_uid")
    rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}
    batches = []
    for start in range(0, table.num_rows, batch_rows):
        batch = {c: v[start : start + batch_rows] for c, v in rows.items()}
        batches.append(decode_pairs(batch, resolution=64))
    uids = set(rows["image_0_uid"]) | set(rows["image_1_uid"])
    return batches, uids


def test_a_recurring_image_goes_through_the_vae_once_per_view(
    tiny_sd15: Path, synthetic_parquet: Path
) -> None:
    batches, uids = _decoded_batches(synthetic_parquet / "train", batch_rows=8)
    slots = sum(2 * len(b["ranking_id"]) for b in batches)
    assert len(uids) < 0.8 * slots  # the synthetic set repeats images as Pick-a-Pic does
    encoder = LatentEncoder(str(tiny_sd15), device="cpu")
    outputs = [encoder(dict(b)) for b in batches]
    assert encoder.vae_images == 2 * len(uids)  # plain + flipped, each unique image once
    # every pair that holds an image stores the same bytes for it, whichever batch encoded it
    stored: dict[str, bytes] = {}
    for batch, out in zip(batches, outputs, strict=True):
        assert "w_image" not in out and "w" not in out  # keys and pixels do not reach the tars
        for side in ("w", "l"):
            for i, key in enumerate(batch[f"{side}_image"]):
                value = b"".join(
                    out[f"{side}_{part}"][i].tobytes() for part in ("mean", "logvar", "mean_flip")
                )
                assert stored.setdefault(key, value) == value


def test_reuse_within_a_batch_only_and_unique_batches_are_unchanged(
    tiny_sd15: Path, synthetic_parquet: Path
) -> None:
    """With several actors an image is shared only within a batch; a batch without a repeat is encoded exactly as
    without the reuse: the same VAE call over [w; l; w_flip; l_flip], the same bytes."""
    batches, _ = _decoded_batches(synthetic_parquet / "validation", batch_rows=4)
    per_batch = LatentEncoder(str(tiny_sd15), device="cpu", reuse_across_batches=False)
    for batch in batches:
        per_batch(dict(batch))
    assert per_batch.vae_images == sum(2 * len({*b["w_image"], *b["l_image"]}) for b in batches)
    # rows whose four images are all different from each other's: no reuse possible
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    seen: set[str] = set()
    picked = []
    for i, pair in enumerate(zip(rows["w_image"], rows["l_image"], strict=True)):
        if len(set(pair)) == 2 and not seen.intersection(pair):
            seen.update(pair)
            picked.append(i)
    unique = {k: v[picked[:4]] for k, v in rows.items()}
    assert len(unique["ranking_id"]) == 4
    reused = LatentEncoder(str(tiny_sd15), device="cpu")(dict(unique))
    without_keys = LatentEncoder(str(tiny_sd15), device="cpu")(
        {k: v for k, v in unique.items() if "_image" not in k}
    )
    latents = [k for k in without_keys if k.startswith(("w_", "l_"))]
    assert len(latents) == 8 and all(np.array_equal(reused[k], without_keys[k]) for k in latents)


def test_channels_last_and_compiled_vae_give_the_same_moments(tiny_sd15: Path) -> None:
    """The VAE speed options (--vae-channels-last, --vae-compile) change the order of the arithmetic, not what the
    encoder computes: equal to the eager NCHW moments within float rounding (8e-5 relative, measured), a fifth of
    what fp16 storage rounds away (4.9e-4)."""
    pixels = torch.from_numpy(_images(4, seed=5))
    eager = LatentEncoder(str(tiny_sd15), device="cpu").moments(pixels)
    fast = LatentEncoder(str(tiny_sd15), device="cpu", channels_last=True, compile=True).moments(pixels)
    for a, b in zip(eager, fast, strict=True):
        assert float((a - b).norm() / a.norm()) < 2e-4
