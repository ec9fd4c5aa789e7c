"""The synthetic Pick-a-Pic data: exact v2 columns, the dataset's quirks, determinism, and the preference rule."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedded.synthetic import COLOURS, DEFECTS, DEFECTS_FILE, main, write_synthetic_dataset

# Pick-a-Pic v2 dataset card (peers.md §1.1), in the card's column order.
PICKAPIC_V2_COLUMNS = {
    "are_different": pa.bool_(),
    "best_image_uid": pa.string(),
    "caption": pa.string(),
    "created_at": pa.timestamp("ns"),
    "has_label": pa.bool_(),
    "image_0_uid": pa.string(),
    "image_0_url": pa.string(),
    "image_1_uid": pa.string(),
    "image_1_url": pa.string(),
    "jpg_0": pa.binary(),
    "jpg_1": pa.binary(),
    "label_0": pa.float64(),
    "label_1": pa.float64(),
    "model_0": pa.string(),
    "model_1": pa.string(),
    "ranking_id": pa.int64(),
    "user_id": pa.int64(),
    "num_example_per_prompt": pa.int64(),
    "__index_level_0__": pa.int64(),
}


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough rows for the statistical checks (tie fraction); takes about a second."""
    root = tmp_path_factory.mktemp("synthetic_big")
    write_synthetic_dataset(root, seed=7, rows=800, val_rows=200, rows_per_file=400)
    return root


def _rows(split_dir: Path) -> list[dict]:
    return pq.read_table(sorted(split_dir.glob("*.parquet"))).to_pylist()


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet"))


def test_columns_and_dtypes_are_exactly_pickapic_v2(synthetic_parquet: Path) -> None:
    for path in _files(synthetic_parquet):
        schema = pq.read_schema(path)
        assert dict(zip(schema.names, schema.types, strict=True)) == PICKAPIC_V2_COLUMNS, path


def test_splits_have_several_files_and_unique_ranking_ids(synthetic_parquet: Path) -> None:
    train, val = _rows(synthetic_parquet / "train"), _rows(synthetic_parquet / "validation")
    assert len(train) == 120 and len(val) == 40
    assert len(list((synthetic_parquet / "train").glob("*.parquet"))) >= 3
    assert len(list((synthetic_parquet / "validation").glob("*.parquet"))) >= 3
    ids = [r["ranking_id"] for r in train + val]
    assert len(set(ids)) == len(ids)
    assert not list(synthetic_parquet.rglob(".*")), "temporary files left behind"


def test_tie_fraction_is_about_eleven_percent(big: Path) -> None:
    rows = _rows(big / "train") + _rows(big / "validation")
    ties = [r for r in rows if r["label_0"] == 0.5]
    assert 0.07 <= len(ties) / len(rows) <= 0.15
    assert all(r["label_1"] == 0.5 for r in ties)
    decided = [r for r in rows if r["label_0"] != 0.5]
    assert {r["label_0"] for r in decided} == {0.0, 1.0}
    assert all(r["label_0"] + r["label_1"] == 1.0 for r in rows)
    # the preferred image sits at both positions, in roughly equal shares
    assert 0.35 <= sum(r["label_0"] == 1.0 for r in decided) / len(decided) <= 0.65
    for r in decided:
        assert r["best_image_uid"] == (r["image_0_uid"] if r["label_0"] == 1.0 else r["image_1_uid"])


def test_captions_repeat_within_sessions_and_across_them(big: Path) -> None:
    rows = _rows(big / "train")
    counts = Counter(r["caption"] for r in rows)
    assert len(counts) < len(rows) / 5
    assert all(r["num_example_per_prompt"] == counts[r["caption"]] for r in rows)
    runs_per_caption = Counter(
        r["caption"] for i, r in enumerate(rows) if i == 0 or rows[i - 1]["caption"] != r["caption"]
    )
    assert max(runs_per_caption.values()) >= 2, "no caption is reused by a later session"


def test_winner_uid_recurs_in_consecutive_rows_with_the_same_bytes(big: Path) -> None:
    rows = _rows(big / "train")
    recurring = 0
    for prev, cur in itertools.pairwise(rows):
        if prev["label_0"] == 0.5 or prev["caption"] != cur["caption"]:
            continue
        if prev["best_image_uid"] in (cur["image_0_uid"], cur["image_1_uid"]):
            recurring += 1
    assert recurring >= len(rows) / 2
    jpeg_by_uid: dict[str, str] = {}
    for r in rows:
        for side in ("0", "1"):
            digest = hashlib.sha1(r[f"jpg_{side}"]).hexdigest()
            assert jpeg_by_uid.setdefault(r[f"image_{side}_uid"], digest) == digest


def test_sizes_are_mixed_and_often_unequal_within_a_row(big: Path) -> None:
    rows = _rows(big / "train")[:300]
    sizes = [(Image.open(io.BytesIO(r["jpg_0"])).size, Image.open(io.BytesIO(r["jpg_1"])).size) for r in rows]
    seen = {s for pair in sizes for s in pair}
    assert {(512, 512), (768, 768), (1024, 1024)} <= seen
    assert any(w != h for w, h in seen), "no non-square image"
    assert sum(a != b for a, b in sizes) >= len(rows) / 4
    assert all(Image.open(io.BytesIO(rows[0][k])).format == "JPEG" for k in ("jpg_0", "jpg_1"))
    assert all(Image.open(io.BytesIO(rows[0][k])).mode == "RGB" for k in ("jpg_0", "jpg_1"))


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    def digests(root: Path) -> list[str]:
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(root)]

    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_synthetic_dataset(tmp_path / name, seed=seed, rows=30, val_rows=10, rows_per_file=10)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert digests(tmp_path / "a") != digests(tmp_path / "c")


def _colour_shares(jpeg: bytes) -> dict[str, float]:
    """Fraction of pixels nearest to each palette colour (within a margin), at the 64 px the demo encodes at."""
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").resize((64, 64)), dtype=np.float32)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    dist = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)
    nearest = dist.argmin(-1)[dist.min(-1) < 60]
    counts = np.bincount(nearest, minlength=len(COLOURS)) / (64 * 64)
    return dict(zip(COLOURS, counts.tolist(), strict=True))


def _is_washed_out(jpeg: bytes) -> bool:
    """The centre object blended halfway to the background: 2·object − background is a palette colour that the
    object itself is far from."""
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    pixels = np.asarray(img.resize((img.width // 8, img.height // 8)), dtype=np.float32)
    h, w = pixels.shape[:2]
    centre = np.median(pixels[h // 2 - 2 : h // 2 + 3, w // 2 - 2 : w // 2 + 3].reshape(-1, 3), axis=0)
    background = pixels[1, 1]
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    unwashed = np.linalg.norm(palette - (2 * centre - background), axis=-1)
    return bool(unwashed.min() < 40 and np.linalg.norm(palette[unwashed.argmin()] - centre) > 40)


def _unwashed_colour(jpeg: bytes) -> str:
    """The palette colour that the washed-out centre object was blended from."""
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    pixels = np.asarray(img.resize((img.width // 8, img.height // 8)), dtype=np.float32)
    h, w = pixels.shape[:2]
    centre = np.median(pixels[h // 2 - 2 : h // 2 + 3, w // 2 - 2 : w // 2 + 3].reshape(-1, 3), axis=0)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    return list(COLOURS)[int(np.linalg.norm(palette - (2 * centre - pixels[1, 1]), axis=-1).argmin())]


def test_preferred_image_has_the_caption_colour_and_the_loser_its_recorded_defect(big: Path) -> None:
    rows = _rows(big / "validation")
    defects = {int(k): v for k, v in json.loads((big / "validation" / DEFECTS_FILE).read_text()).items()}
    assert set(defects) == {r["ranking_id"] for r in rows if r["label_0"] != 0.5}
    shares = Counter(defects.values())
    assert set(shares) == set(DEFECTS) and min(shares.values()) > len(defects) / 5, shares
    for r in rows:
        colour = next(c for c in COLOURS if c in r["caption"].split())
        a, b = _colour_shares(r["jpg_0"]), _colour_shares(r["jpg_1"])
        if r["label_0"] == 0.5:
            assert max(a, key=a.get) == colour and max(b, key=b.get) == colour
            continue
        win, lose = (a, b) if r["label_0"] == 1.0 else (b, a)
        win_jpeg, lose_jpeg = (r["jpg_0"], r["jpg_1"]) if r["label_0"] == 1.0 else (r["jpg_1"], r["jpg_0"])
        assert max(win, key=win.get) == colour and win[colour] > 0.2, r["ranking_id"]
        assert not _is_washed_out(win_jpeg), r["ranking_id"]
        defect = defects[r["ranking_id"]]
        assert _is_washed_out(lose_jpeg) == (defect != "colour"), (r["ranking_id"], defect)
        if defect == "colour":
            assert max(lose, key=lose.get) != colour and lose[colour] < 0.02, r["ranking_id"]
        else:
            assert (_unwashed_colour(lose_jpeg) == colour) == (defect == "contrast"), (
                r["ranking_id"],
                defect,
            )


def test_cli_writes_both_splits_and_rejects_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["--out", str(tmp_path / "d"), "--seed", "1", "--rows", "12", "--val-rows", "5"]) == 0
    assert "train 12 rows" in capsys.readouterr().out
    assert len(_rows(tmp_path / "d" / "train")) == 12 and len(_rows(tmp_path / "d" / "validation")) == 5
    assert main(["--out", str(tmp_path / "e"), "--rows", "0"]) == 2
    assert "rows" in capsys.readouterr().err
