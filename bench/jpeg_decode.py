"""JPEG decode + resize + center crop to R: PIL (draft) vs simplejpeg (DCT scaling) vs PyTurboJPEG.

Why: decode is the encode job's CPU cost per image; stages/decode_images.py uses the fastest backend that matches a
full-resolution reference. Each backend decodes at a reduced DCT scale that is never below the resized size, then
runs the same PIL bilinear box resize.

CLI: python -m bench.jpeg_decode [--resolution 512 64] [--images 24] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import random
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from embedded.synthetic import COLOURS, OBJECTS, render_image
from stages.decode_images import crop_geometry, decode_image


def _turbojpeg_decoder() -> Callable[[bytes, int], np.ndarray] | None:
    """PyTurboJPEG needs the libturbojpeg shared library, which pip does not ship; None when it is missing."""
    try:
        from turbojpeg import TurboJPEG

        turbo = TurboJPEG()
    except (ImportError, OSError, RuntimeError):
        return None

    def decode(data: bytes, resolution: int) -> np.ndarray:
        w, h, _, _ = turbo.decode_header(data)
        g = crop_geometry((h, w), resolution)
        factors = sorted(turbo.scaling_factors, key=lambda f: f[0] / f[1])
        factor = next(
            f for f in factors if h * f[0] / f[1] >= g.resized[0] and w * f[0] / f[1] >= g.resized[1]
        )
        img = Image.fromarray(turbo.decode(data, pixel_format=0, scaling_factor=factor))  # TJPF_RGB
        sy, sx = img.height / g.resized[0], img.width / g.resized[1]
        box = (g.left * sx, g.top * sy, (g.left + resolution) * sx, (g.top + resolution) * sy)
        return np.asarray(img.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box))

    return decode


def _reference(data: bytes, resolution: int) -> np.ndarray:
    """Full-resolution decode, full resize, crop: what the fast paths approximate."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    g = crop_geometry((img.height, img.width), resolution)
    full = np.asarray(img.resize((g.resized[1], g.resized[0]), Image.Resampling.BILINEAR))
    return full[g.top : g.top + resolution, g.left : g.left + resolution]


def sample_jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [render_image(rng, rng.choice(OBJECTS), c, c, False).jpeg for c in rng.choices(list(COLOURS), k=n)]


def run(
    resolutions: tuple[int, ...] = (512, 64), images: int = 24, repeat: int = 3, seed: int = 0
) -> list[dict]:
    """One row per (backend, resolution): images/s (best of `repeat`) and mean/max abs error vs the reference."""
    jpegs = sample_jpegs(images, seed)
    backends: dict[str, Callable[[bytes, int], np.ndarray] | None] = {
        "pil": lambda d, r: decode_image(d, r, preprocess="fast", decoder="pil")[0],
        "simplejpeg": lambda d, r: decode_image(d, r, preprocess="fast", decoder="simplejpeg")[0],
        "pyturbojpeg": _turbojpeg_decoder(),
    }
    rows = []
    for resolution in resolutions:
        refs = [_reference(d, resolution).astype(np.int16) for d in jpegs]
        for name, fn in backends.items():
            if fn is None:
                rows.append({"backend": name, "resolution": resolution, "available": False})
                continue
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                outs = [fn(d, resolution) for d in jpegs]
                best = min(best, time.perf_counter() - t0)
            err = [np.abs(o.astype(np.int16) - r) for o, r in zip(outs, refs, strict=True)]
            rows.append(
                {
                    "backend": name,
                    "resolution": resolution,
                    "available": True,
                    "images_per_s": round(len(jpegs) / best, 1),
                    "mean_abs_err": round(float(np.mean([e.mean() for e in err])), 3),
                    "max_abs_err": int(max(e.max() for e in err)),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, nargs="+", default=[512, 64])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    for row in run(tuple(args.resolution), args.images, args.repeat):
        print(row)


if __name__ == "__main__":
    main()
