"""Image bytes → winner-first uint8 crops at the training resolution, with the metadata SDXL's time ids need.

Pure functions (no Ray import): the Ray pipeline runs `decode_pairs` as CPU tasks, the benchmark and tests call
them directly. The default (`preprocess="official"`) is DiffusionDPO's train.py bit for bit:
`Image.open(b).convert("RGB")` → torchvision `Resize(R, BILINEAR)` (shortest side to R, long side truncated, PIL
bilinear over the whole image) → `CenterCrop(R)`; tests/test_preprocess_oracle.py checks it against torchvision
itself. `preprocess="fast"` decodes JPEGs already shrunk in the DCT and resizes only the crop box: a different
low-pass filter, opt-in, with its measured deviation in the README. Alpha follows `.convert("RGB")` (the alpha
channel is dropped) unless `alpha="white"` composites onto white. Bad rows are dropped with a reason, never
failing the job; odd but valid images (grayscale, CMYK, palette, alpha, extreme aspect) are converted.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from schemas import storage
from schemas.config import ALPHA_MODES, PREPROCESS_MODES
from schemas.manifest import DROP_EMPTY_IMAGE, DROP_NULL_IMAGE, DROP_UNDECODABLE_IMAGE
from schemas.sample import ImageMeta, PairMeta, caption_key

JPEG_MAGIC = b"\xff\xd8"
# JPEG decoders; at full scale both equal PIL's (tested), simplejpeg is faster
DECODERS = ("simplejpeg", "pil")
# The official path materialises the whole resized image before cropping. Past this many pixels (an aspect ratio
# beyond 64:1 at R = 1024) it resizes only the crop box instead, which can differ by one grey level.
MAX_RESIZED_PIXELS = 1 << 26
_ALPHA_IMAGE_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# simplejpeg converts these to RGB exactly as PIL does; its CMYK/YCCK → RGB differs from PIL's by one grey level
_SIMPLEJPEG_COLORSPACES = ("YCbCr", "Gray")


class ImageDropped(Exception):
    """A row-level image problem; `reason` is one of the DROP_* constants."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Geometry:
    """Where the R×R center crop sits in the image resized so that its shortest side is R."""

    # (height, width) after the shortest-side resize
    resized: tuple[int, int]
    top: int
    left: int
    resolution: int

    @property
    def left_flip(self) -> int:
        """The same crop's left edge once the resized image is flipped horizontally."""
        return self.resized[1] - self.resolution - self.left


def crop_geometry(original: tuple[int, int], resolution: int) -> Geometry:
    """torchvision's Resize(int) + CenterCrop arithmetic: long side truncated, offsets rounded."""
    h, w = original
    if h <= w:
        new_h, new_w = resolution, int(resolution * w / h)
    else:
        new_h, new_w = int(resolution * h / w), resolution
    top = round((new_h - resolution) / 2.0)
    left = round((new_w - resolution) / 2.0)
    return Geometry((new_h, new_w), top, left, resolution)


def check_options(preprocess: str, alpha: str, decoder: str = "simplejpeg") -> None:
    for name, value, allowed in (
        ("preprocess", preprocess, PREPROCESS_MODES),
        ("alpha", alpha, ALPHA_MODES),
        ("decoder", decoder, DECODERS),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _to_rgb(img: Image.Image, alpha: str) -> Image.Image:
    """`.convert("RGB")` as the official code does (alpha dropped), or transparency composited onto white."""
    if alpha == "white" and (img.mode in _ALPHA_IMAGE_MODES or "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _open(
    data: bytes, resolution: int, decoder: str, dct_scaled: bool
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to PIL; returns (image, original hw). With `dct_scaled`, a JPEG is decoded at the smallest DCT scale
    that is still at least the resized size (the fast path); otherwise at full size, as the official code does."""
    if decoder == "simplejpeg" and data[:2] == JPEG_MAGIC:
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace in _SIMPLEJPEG_COLORSPACES:
                rh, rw = crop_geometry((h, w), resolution).resized if dct_scaled else (0, 0)
                rgb = simplejpeg.decode_jpeg(data, "RGB", min_height=rh, min_width=rw)
                return Image.fromarray(rgb), (h, w)
        except ValueError:
            # truncated, ...: PIL decides below whether the bytes are usable
            pass
    img = Image.open(io.BytesIO(data))
    original = (img.height, img.width)
    if dct_scaled and img.format == "JPEG":
        rh, rw = crop_geometry(original, resolution).resized
        # DCT scaling; PIL keeps the result >= the requested size
        img.draft("RGB", (rw, rh))
    img.load()
    return img, original


def _resize_and_crop(img: Image.Image, g: Geometry, whole_image: bool) -> np.ndarray:
    """Resize so the shortest side is R, then take the center crop.

    whole_image: PIL bilinear over the whole image, then the crop (torchvision's `Resize` then `CenterCrop`).
    Otherwise only the crop box is resampled (`resize(box=...)`): the same filter positions in exact arithmetic,
    but rounded differently, and from an image that may already be DCT-scaled, so its size is not the original's.
    """
    r = g.resolution
    if whole_image and g.resized[0] * g.resized[1] <= MAX_RESIZED_PIXELS:
        resized = img.resize((g.resized[1], g.resized[0]), Image.Resampling.BILINEAR)
        return np.asarray(resized.crop((g.left, g.top, g.left + r, g.top + r)))
    # resized → decoded coordinates
    sy, sx = img.height / g.resized[0], img.width / g.resized[1]
    box = (g.left * sx, g.top * sy, (g.left + r) * sx, (g.top + r) * sy)
    return np.asarray(img.resize((r, r), Image.Resampling.BILINEAR, box=box))


def decode_image(
    data: bytes | None,
    resolution: int,
    *,
    preprocess: str = "official",
    alpha: str = "convert",
    decoder: str = "simplejpeg",
) -> tuple[np.ndarray, ImageMeta]:
    """Bytes → (uint8 [R, R, 3], ImageMeta with an empty uid); raises ImageDropped for unusable bytes."""
    check_options(preprocess, alpha, decoder)
    if data is None:
        raise ImageDropped(DROP_NULL_IMAGE)
    if len(data) == 0:
        raise ImageDropped(DROP_EMPTY_IMAGE)
    fast = preprocess == "fast"
    try:
        img, original = _open(data, resolution, decoder, dct_scaled=fast)
        img = _to_rgb(img, alpha)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageDropped(DROP_UNDECODABLE_IMAGE, str(e)) from e
    g = crop_geometry(original, resolution)
    pixels = _resize_and_crop(img, g, whole_image=not fast)
    meta = ImageMeta(
        uid="", original_size=original, crop_top_left=(g.top, g.left), crop_top_left_flip=(g.top, g.left_flip)
    )
    return pixels, meta


def winner_first(label_0: float) -> bool:
    """True when jpg_0 is the preferred image (label_0 == 1; ties keep jpg_0 first)."""
    return label_0 >= 0.5


def image_key(data: bytes | None) -> str:
    """What identifies an image for reuse: its bytes (SHA-1), not its uid, so a uid that a dataset got wrong can
    never give one image another's latents; a recurring Pick-a-Pic uid holds the same bytes, so it reuses alike."""
    return hashlib.sha1(data or b"").hexdigest()


def decode_pairs(
    batch: dict[str, np.ndarray],
    *,
    resolution: int,
    drops_dir: str | None = None,
    preprocess: str = "official",
    alpha: str = "convert",
) -> dict[str, np.ndarray]:
    """Ray `map_batches` UDF: parquet columns → ranking_id, json (PairMeta bytes), w, l (uint8 [N, R, R, 3]) and
    w_image, l_image (each image's `image_key`, so the VAE stage encodes a recurring image once).

    An image that recurs in the batch is decoded once. Dropped rows are recorded as `{ranking_id: reason}` in a
    fresh JSON file under `drops_dir`, so retried or resumed tasks only ever add duplicates, which the chunk
    finaliser removes by ranking_id.
    """
    out: dict[str, list] = {"ranking_id": [], "json": [], "w": [], "l": [], "w_image": [], "l_image": []}
    drops: dict[str, str] = {}
    decoded: dict[str, tuple[np.ndarray, ImageMeta]] = {}

    def decode_once(data: bytes | None) -> tuple[str, tuple[np.ndarray, ImageMeta]]:
        key = image_key(data)
        if key not in decoded:
            decoded[key] = decode_image(data, resolution, preprocess=preprocess, alpha=alpha)
        return key, decoded[key]

    for i, rid in enumerate(batch["ranking_id"]):
        rid = int(rid)
        label_0 = float(batch["label_0"][i])
        order = (0, 1) if winner_first(label_0) else (1, 0)
        try:
            (w_key, (w_px, w_meta)), (l_key, (l_px, l_meta)) = (
                decode_once(batch[f"jpg_{j}"][i]) for j in order
            )
        except ImageDropped as e:
            drops[str(rid)] = e.reason
            continue
        meta = PairMeta(
            ranking_id=rid,
            caption_key=caption_key(str(batch["caption"][i])),
            label_0=label_0,
            w=_with_uid(w_meta, batch[f"image_{order[0]}_uid"][i]),
            l=_with_uid(l_meta, batch[f"image_{order[1]}_uid"][i]),
        )
        out["ranking_id"].append(rid)
        out["json"].append(meta.to_json_bytes())
        out["w"].append(w_px)
        out["l"].append(l_px)
        out["w_image"].append(w_key)
        out["l_image"].append(l_key)
    if drops and drops_dir is not None:
        storage.write_json(storage.join(drops_dir, f"{uuid.uuid4().hex}.json"), drops)
    empty = np.zeros((0, resolution, resolution, 3), np.uint8)
    return {
        "ranking_id": np.asarray(out["ranking_id"], dtype=np.int64),
        "json": np.asarray(out["json"], dtype=object),
        "w": np.stack(out["w"]) if out["w"] else empty,
        "l": np.stack(out["l"]) if out["l"] else empty,
        "w_image": np.asarray(out["w_image"], dtype=object),
        "l_image": np.asarray(out["l_image"], dtype=object),
    }


def _with_uid(meta: ImageMeta, uid: Any) -> ImageMeta:
    return ImageMeta(
        uid=str(uid),
        original_size=meta.original_size,
        crop_top_left=meta.crop_top_left,
        crop_top_left_flip=meta.crop_top_left_flip,
    )


def read_drops(drops_dir: str) -> dict[str, str]:
    """Merge the per-task drop files (a directory or key prefix): one reason per ranking_id however often a task
    ran."""
    merged: dict[str, str] = {}
    for name in storage.list_names(drops_dir):
        if name.endswith(".json"):
            merged.update(storage.read_json(storage.join(drops_dir, name)))
    return merged
