"""The encode's pixels against the official recipe, computed by torchvision itself (the oracle, not a re-derivation).

Oracle: `Compose([Resize(R, BILINEAR), CenterCrop(R)])(Image.open(...).convert("RGB"))`, as DiffusionDPO's train.py
does at every step, over textured images of many sizes, encodings and colour modes (tests/fixtures/image_zoo.py).
The default decode must equal it bit for bit; the opt-in fast path only approximately.

Why this torchvision and how it imports: `make setup` pins torch 2.13.0 (the CPU build on this machine's disk), so
pyproject.toml's `[tool.dpo-latents] test-oracle` pins torchvision 0.28.0, the release built for torch 2.13.0 (its
wheel requires `torch==2.13.0`). PyPI serves only its CUDA build, whose compiled ops cannot load beside a CPU torch;
its import then stops on an unguarded fake-kernel registration for `torchvision::nms`, and transformers imports any
torchvision it finds, so in site-packages it would break `import diffusers` everywhere. `make setup` therefore
installs it with --no-deps into .venv/oracle, and `torchvision_transforms()` imports it from there after declaring
the two detection-op schemas it registers against (test-only, never called). The alternative that imports without
help, torch 2.14.1 + torchvision 0.29.1, is a 5.5 GB CUDA install, which the team rules out. The transforms used are
pure Python over PIL, so the expected pixels come from torchvision's own code: `test_the_oracle_runs_torchvision_code`
checks that from the frames that execute.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from schemas.sample import PairMeta
from stages import decode_images
from stages.decode_images import decode_image, decode_pairs
from tests.fixtures.image_zoo import (
    encoded,
    image_zoo,
    official_pixels,
    textured,
    torchvision_transforms,
)

ZOO = image_zoo()
RESOLUTIONS = (64, 512, 1024)  # tiny models, SD1.5, SDXL
EXTREME = ("jpeg-wide-2000x40", "png-tall-gray-30x1500")


def test_the_oracle_runs_torchvision_code() -> None:
    """The expected pixels come out of torchvision's transforms (Resize → PIL resize, CenterCrop → PIL crop)."""
    transforms = torchvision_transforms()
    import torchvision

    assert torchvision.__version__.startswith("0.28.")
    package = Path(transforms.__file__).parent.parent
    ran: set[tuple[str, str]] = set()

    def record(frame, event, arg) -> None:
        if event == "call":
            ran.add((frame.f_code.co_filename, frame.f_code.co_name))

    sys.setprofile(record)
    try:
        official_pixels(ZOO["jpeg-444-1024x1536"], 64)
    finally:
        sys.setprofile(None)
    in_torchvision = {
        (Path(f).relative_to(package).as_posix(), name) for f, name in ran if Path(f).is_relative_to(package)
    }
    for expected in [
        ("transforms/transforms.py", "forward"),
        ("transforms/functional.py", "resize"),
        ("transforms/_functional_pil.py", "resize"),
        ("transforms/functional.py", "center_crop"),
        ("transforms/_functional_pil.py", "crop"),
    ]:
        assert expected in in_torchvision, f"{expected} did not run; ran {sorted(in_torchvision)}"
    assert not any("/stages/" in f for f, _ in ran), "the oracle must not call the code under test"


def _mismatch(ours: np.ndarray, ref: np.ndarray) -> str:
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    return f"{int((diff > 0).sum())} of {diff.size} values differ, max {int(diff.max())} grey levels"


CASES = [
    (name, r)
    for name in sorted(ZOO)
    for r in RESOLUTIONS
    if not (
        r == 1024 and name in EXTREME
    )  # 52-megapixel intermediates: R = 512 takes the same path, 4× faster
]


@pytest.mark.parametrize(("name", "resolution"), CASES)
def test_default_decode_equals_torchvision_bit_for_bit(name: str, resolution: int) -> None:
    data = ZOO[name]
    pixels, meta = decode_image(data, resolution)
    ref = official_pixels(data, resolution)
    assert pixels.shape == ref.shape == (resolution, resolution, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, ref), _mismatch(pixels, ref)
    # the stored SDXL crop offsets locate the crop in torchvision's resized image, plain and flipped
    T = torchvision_transforms()
    with Image.open(io.BytesIO(data)) as img:
        assert meta.original_size == (img.height, img.width)
        resized = T.Resize(resolution, interpolation=T.InterpolationMode.BILINEAR)(img.convert("RGB"))
    for (top, left), view in (
        (meta.crop_top_left, resized),
        (meta.crop_top_left_flip, T.functional.hflip(resized)),
    ):
        crop = np.asarray(view)[top : top + resolution, left : left + resolution]
        assert np.array_equal(crop, pixels if view is resized else pixels[:, ::-1])


def test_beyond_the_intermediate_size_cap_only_the_crop_box_is_resized(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past MAX_RESIZED_PIXELS the decode resizes only the crop box: within one grey level of the oracle."""
    monkeypatch.setattr(decode_images, "MAX_RESIZED_PIXELS", 64 * 64)
    data = ZOO["jpeg-wide-2000x40"]
    pixels, _ = decode_image(data, 64)
    diff = np.abs(pixels.astype(np.int16) - official_pixels(data, 64).astype(np.int16))
    assert diff.max() <= 1


@pytest.mark.parametrize("decoder", ["simplejpeg", "pil"])
def test_both_jpeg_decoders_equal_torchvision(decoder: str) -> None:
    for name in (n for n in sorted(ZOO) if n.startswith("jpeg")):
        pixels, _ = decode_image(ZOO[name], 64, decoder=decoder)
        ref = official_pixels(ZOO[name], 64)
        assert np.array_equal(pixels, ref), f"{name}: {_mismatch(pixels, ref)}"


def test_pair_of_different_sizes_winner_first_equals_torchvision(tmp_path: Path) -> None:
    """jpg_0 1024×1536 JPEG and jpg_1 512×512 PNG, label_0 = 0: jpg_1 is the winner; both equal the oracle."""
    jpg_0, jpg_1 = ZOO["jpeg-444-1024x1536"], encoded(textured(512, 512, 21), "PNG")
    batch = {
        "ranking_id": np.array([7]),
        "caption": np.array(["a textured pair"], dtype=object),
        "label_0": np.array([0.0]),
        "jpg_0": np.array([jpg_0], dtype=object),
        "jpg_1": np.array([jpg_1], dtype=object),
        "image_0_uid": np.array(["u0"], dtype=object),
        "image_1_uid": np.array(["u1"], dtype=object),
    }
    out = decode_pairs(batch, resolution=64, drops_dir=str(tmp_path))
    meta = PairMeta.from_json_bytes(out["json"][0])
    assert (meta.w.uid, meta.l.uid) == ("u1", "u0")
    assert (meta.w.original_size, meta.l.original_size) == ((512, 512), (1536, 1024))
    assert np.array_equal(out["w"][0], official_pixels(jpg_1, 64))
    assert np.array_equal(out["l"][0], official_pixels(jpg_0, 64))


def test_alpha_follows_convert_rgb_by_default_and_white_on_request() -> None:
    """A fully transparent red image: `.convert("RGB")` keeps the red; `alpha="white"` composites onto white."""
    data = encoded(Image.new("RGBA", (128, 96), (255, 0, 0, 0)), "PNG")
    default, _ = decode_image(data, 64)
    assert np.array_equal(default, official_pixels(data, 64))
    assert (default == [255, 0, 0]).all()
    white, _ = decode_image(data, 64, alpha="white")
    assert (white == 255).all()
    half = encoded(Image.new("RGBA", (64, 64), (0, 0, 0, 128)), "PNG")  # half-transparent black → mid grey
    assert np.abs(decode_image(half, 64, alpha="white")[0].astype(int) - 127).max() <= 1


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("resolution", [64, 512])
def test_fast_path_is_opt_in_and_only_approximate(resolution: int) -> None:
    """`preprocess="fast"` (DCT-scaled JPEG decode + resize over the crop box) differs from the oracle on a
    textured JPEG much larger than R, yet stays recognisably the same image."""
    data = ZOO["jpeg-420-1536x1024"]
    ref = official_pixels(data, resolution)
    fast, _ = decode_image(data, resolution, preprocess="fast")
    assert not np.array_equal(fast, ref)
    assert psnr(fast, ref) > 20.0


@pytest.mark.parametrize(("option", "value"), [("preprocess", "exact"), ("alpha", "black")])
def test_unknown_options_are_errors_naming_the_option(option: str, value: str) -> None:
    with pytest.raises(ValueError, match=option):
        decode_image(ZOO["png-rgb-333x500"], 64, **{option: value})
