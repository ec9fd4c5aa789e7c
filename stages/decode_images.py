"""Image bytes → winner-first uint8 crops at the training resolution, with the metadata SDXL's time ids need.

Pure functions (no Ray import): the Ray pipeline runs `decode_pairs` as CPU tasks, the benchmark and tests call
them directly. Preprocessing follows the official DiffusionDPO recipe: resize the shortest side to R (bilinear),
center crop R×R. The crop is taken with PIL's `resize(box=...)`, which samples exactly the pixels a full resize
followed by a crop would keep, without materialising a huge intermediate for extreme aspect ratios.
Bad rows are dropped with a reason, never failing the job; odd but valid images (grayscale, CMYK, palette, alpha,
extreme aspect) are converted.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from schemas import storage
from schemas.manifest import DROP_EMPTY_IMAGE, DROP_NULL_IMAGE, DROP_UNDECODABLE_IMAGE
from schemas.sample import ImageMeta, PairMeta, caption_key

JPEG_MAGIC = b"\xff\xd8"
DECODERS = ("simplejpeg", "pil")  # JPEG decoders; bench/jpeg_decode.py measured simplejpeg as the fastest


class ImageDropped(Exception):
    """A row-level image problem; `reason` is one of the DROP_* constants."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Geometry:
    """Where the R×R center crop sits in the image resized so that its shortest side is R."""

    resized: tuple[int, int]  # (height, width) after the shortest-side resize
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
        new_h, new_w = resolution, max(resolution, int(resolution * w / h))
    else:
        new_h, new_w = max(resolution, int(resolution * h / w)), resolution
    top = round((new_h - resolution) / 2.0)
    left = round((new_w - resolution) / 2.0)
    return Geometry((new_h, new_w), top, left, resolution)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → RGB; transparent pixels are composited on white rather than turning black."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _open(data: bytes, geometry_of: Any, decoder: str) -> tuple[Image.Image, tuple[int, int]]:
    """Decode at the smallest JPEG scale that is still at least the resized size; returns (image, original hw)."""
    if decoder == "simplejpeg" and data[:2] == JPEG_MAGIC:
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            rh, rw = geometry_of((h, w)).resized
            return Image.fromarray(simplejpeg.decode_jpeg(data, "RGB", min_height=rh, min_width=rw)), (h, w)
        except ValueError:
            pass  # CMYK, truncated, ...: PIL decides below whether the bytes are usable
    img = Image.open(io.BytesIO(data))
    original = (img.height, img.width)
    if img.format == "JPEG":
        rh, rw = geometry_of(original).resized
        img.draft("RGB", (rw, rh))  # DCT scaling; PIL keeps the result >= the requested size
    img.load()
    return img, original


def decode_image(
    data: bytes | None, resolution: int, decoder: str = "simplejpeg"
) -> tuple[np.ndarray, ImageMeta]:
    """Bytes → (uint8 [R, R, 3], ImageMeta with an empty uid); raises ImageDropped for unusable bytes."""
    if data is None:
        raise ImageDropped(DROP_NULL_IMAGE)
    if len(data) == 0:
        raise ImageDropped(DROP_EMPTY_IMAGE)
    try:
        img, original = _open(data, lambda hw: crop_geometry(hw, resolution), decoder)
        img = _to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageDropped(DROP_UNDECODABLE_IMAGE, str(e)) from e
    g = crop_geometry(original, resolution)
    sy, sx = img.height / g.resized[0], img.width / g.resized[1]  # resized → decoded (drafted) coordinates
    box = (g.left * sx, g.top * sy, (g.left + resolution) * sx, (g.top + resolution) * sy)
    pixels = np.asarray(img.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box))
    meta = ImageMeta(
        uid="", original_size=original, crop_top_left=(g.top, g.left), crop_top_left_flip=(g.top, g.left_flip)
    )
    return pixels, meta


def winner_first(label_0: float) -> bool:
    """True when jpg_0 is the preferred image (label_0 == 1; ties keep jpg_0 first)."""
    return label_0 >= 0.5


def decode_pairs(
    batch: dict[str, np.ndarray],
    *,
    resolution: int,
    drops_dir: str | None = None,
    decoder: str = "simplejpeg",
) -> dict[str, np.ndarray]:
    """Ray `map_batches` UDF: parquet columns → ranking_id, json (PairMeta bytes), w, l (uint8 [N, R, R, 3]).

    Dropped rows are recorded as `{ranking_id: reason}` in a fresh JSON file under `drops_dir`, so retried or
    resumed tasks only ever add duplicates, which the chunk finaliser removes by ranking_id.
    """
    out: dict[str, list] = {"ranking_id": [], "json": [], "w": [], "l": []}
    drops: dict[str, str] = {}
    for i, rid in enumerate(batch["ranking_id"]):
        rid = int(rid)
        label_0 = float(batch["label_0"][i])
        order = (0, 1) if winner_first(label_0) else (1, 0)
        try:
            decoded = [decode_image(batch[f"jpg_{j}"][i], resolution, decoder) for j in order]
        except ImageDropped as e:
            drops[str(rid)] = e.reason
            continue
        (w_px, w_meta), (l_px, l_meta) = decoded
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
    if drops and drops_dir is not None:
        storage.write_json(storage.join(drops_dir, f"{uuid.uuid4().hex}.json"), drops)
    empty = np.zeros((0, resolution, resolution, 3), np.uint8)
    return {
        "ranking_id": np.asarray(out["ranking_id"], dtype=np.int64),
        "json": np.asarray(out["json"], dtype=object),
        "w": np.stack(out["w"]) if out["w"] else empty,
        "l": np.stack(out["l"]) if out["l"] else empty,
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
