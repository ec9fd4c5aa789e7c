"""decode_images: official resize/crop geometry, conversions of odd images, row drops with reasons."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from schemas.manifest import DROP_EMPTY_IMAGE, DROP_NULL_IMAGE, DROP_UNDECODABLE_IMAGE
from schemas.sample import PairMeta, caption_key
from stages.decode_images import ImageDropped, crop_geometry, decode_image, decode_pairs, read_drops

R = 64


def encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8))


def test_fast_path_dct_scaled_decode_stays_close_to_reference() -> None:
    img = gradient(768, 512)
    data = encoded(img, "JPEG", quality=95)
    for decoder in ("simplejpeg", "pil"):
        pixels, meta = decode_image(data, R, preprocess="fast", decoder=decoder)
        g = crop_geometry((512, 768), R)
        ref = np.asarray(img.resize((g.resized[1], g.resized[0]), Image.Resampling.BILINEAR))
        ref = ref[g.top : g.top + R, g.left : g.left + R].astype(np.int16)
        assert np.abs(pixels.astype(np.int16) - ref).mean() < 3, decoder
        assert meta.original_size == (512, 768)


@pytest.mark.parametrize(
    "make",
    [
        lambda: encoded(gradient(300, 200).convert("L"), "JPEG"),
        lambda: encoded(gradient(300, 200).convert("CMYK"), "JPEG"),
        lambda: encoded(gradient(300, 200).convert("P"), "PNG"),
        lambda: encoded(gradient(2000, 40), "JPEG"),
        lambda: encoded(gradient(30, 1500).convert("L"), "PNG"),
    ],
    ids=["grayscale", "cmyk", "palette", "wide", "tall-gray-png"],
)
def test_odd_images_are_converted_not_dropped(make) -> None:
    pixels, _ = decode_image(make(), R)
    assert pixels.shape == (R, R, 3) and pixels.dtype == np.uint8


def test_png_alpha_is_composited_on_white_on_request() -> None:
    rgba = Image.new("RGBA", (128, 128), (255, 0, 0, 0))  # fully transparent red
    pixels, _ = decode_image(encoded(rgba, "PNG"), R, alpha="white")
    assert (pixels == 255).all()
    palette = Image.new("P", (96, 96), 0)
    palette.putpalette([255, 0, 0] * 256)
    pixels, _ = decode_image(encoded(palette, "PNG", transparency=0), R, alpha="white")
    assert (pixels == 255).all()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (None, DROP_NULL_IMAGE),
        (b"", DROP_EMPTY_IMAGE),
        (b"garbage, not an image", DROP_UNDECODABLE_IMAGE),
        (encoded(gradient(300, 200), "JPEG")[:300], DROP_UNDECODABLE_IMAGE),
        (encoded(gradient(300, 200), "PNG")[:200], DROP_UNDECODABLE_IMAGE),
    ],
)
def test_bad_bytes_raise_with_reason(data: bytes | None, reason: str) -> None:
    with pytest.raises(ImageDropped) as e:
        decode_image(data, R)
    assert e.value.reason == reason


def test_decode_pairs_puts_winner_first_and_records_drops(tmp_path) -> None:
    small, big = encoded(gradient(64, 64), "JPEG"), encoded(gradient(128, 96), "JPEG")
    batch = {
        "ranking_id": np.array([1, 2, 3]),
        "caption": np.array(["a", "b", "c"], dtype=object),
        "label_0": np.array([1.0, 0.0, 1.0]),
        "jpg_0": np.array([small, small, b""], dtype=object),
        "jpg_1": np.array([big, big, big], dtype=object),
        "image_0_uid": np.array(["s1", "s2", "s3"], dtype=object),
        "image_1_uid": np.array(["b1", "b2", "b3"], dtype=object),
    }
    out = decode_pairs(batch, resolution=R, drops_dir=str(tmp_path))
    assert out["ranking_id"].tolist() == [1, 2] and out["w"].shape == (2, R, R, 3)
    first, second = (PairMeta.from_json_bytes(b) for b in out["json"])
    assert (first.w.uid, first.l.uid, first.w.original_size) == ("s1", "b1", (64, 64))
    assert (second.w.uid, second.l.uid, second.w.original_size) == ("b2", "s2", (96, 128))
    assert first.caption_key == caption_key("a") and second.label_0 == 0.0
    assert read_drops(tmp_path) == {"3": DROP_EMPTY_IMAGE}
    assert json.loads(next(tmp_path.glob("*.json")).read_text()) == {"3": DROP_EMPTY_IMAGE}
