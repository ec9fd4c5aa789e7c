"""Synthetic Pick-a-Pic v2: the exact parquet columns and quirks, with a preference a tiny model can learn.

Why synthetic: no dataset download is possible offline, and a real 500 MB shard is far too big for tests and the demo.

The preference rule (coarse on purpose, so it survives a 64x64 resize and a random-init tiny VAE):
  * every caption names one of `COLOURS` and one of `OBJECTS` ("a small red cube, studio lighting");
  * every image is a flat neutral-grey background with one large object (35-60% of the image) in one palette colour,
    and sometimes a small distractor object in another palette colour;
  * the preferred image's object has the caption's colour at full strength; the other image has one `DEFECTS`
    entry, in equal shares: "colour" (a different palette colour: off-prompt, learnable only through the caption),
    "contrast" (the caption's colour washed out, blended halfway towards the background: dull, whatever the
    caption) or "both". Each split's `loser_defects.json` maps ranking_id to its loser's defect, so an evaluation
    can report what was learned per defect (it is not a Pick-a-Pic column, and encode reads only *.parquet);
  * ties (label_0 = label_1 = 0.5, ~11% of rows) are pairs where both images are flawless.
Pick-a-Pic's collection flow is kept: a session is several rows with one caption by one user; the preferred image
stays and a new challenger replaces the other one, so the winning uid (and its exact JPEG bytes) recurs in
consecutive rows. Captions come from a small pool, so they also recur across sessions and users. Image sizes are
mixed (square and non-square), so the two images of a row often differ in size. The preferred image sits at either
position. Everything derives from the seed (no clock), so one seed gives byte-identical parquet files.

CLI: python -m embedded.synthetic --out DIR --seed N --rows N [--val-rows N] [--rows-per-file N]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from schemas.atomic import publish_dir
from schemas.errors import InputError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "orange": (255, 140, 0),
    "yellow": (240, 220, 20),
    "green": (20, 160, 40),
    "cyan": (0, 200, 220),
    "blue": (20, 40, 210),
    "purple": (130, 30, 170),
    "pink": (255, 110, 200),
}
OBJECTS = ("cube", "box", "ball", "circle", "triangle", "pyramid", "diamond")
TEMPLATES = (
    "a {c} {o}",
    "a {c} {o} on a table",
    "a photo of a big {c} {o}",
    "a small {c} {o} in the style of a painting",
    "{c} {o}, studio lighting",
    "a {c} {o} floating in space",
)
# (width, height) and how often each occurs; SD1.5 / SD2.1 / SDXL-like sizes plus portrait and landscape ones.
SIZES: tuple[tuple[int, int], ...] = (
    (512, 512),
    (768, 768),
    (1024, 1024),
    (512, 768),
    (768, 512),
    (640, 1024),
)
SIZE_WEIGHTS = (0.35, 0.2, 0.1, 0.15, 0.12, 0.08)
MODELS = (
    "runwayml/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-2-1",
    "SDXL-beta",
    "dreamlike-art/dreamlike-photoreal-2.0",
)
TIE_FRACTION = 0.11
JPEG_QUALITY = 85
DEFECTS = ("colour", "contrast", "both")  # what makes the non-preferred image worse, drawn uniformly
DEFECTS_FILE = "loser_defects.json"
EPOCH = datetime(2023, 4, 1)

SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
        ("__index_level_0__", pa.int64()),
    ]
)


def vocabulary() -> list[str]:
    """Every word a synthetic caption can contain, so the tiny tokenizer can give each its own token."""
    words = set(COLOURS) | set(OBJECTS)
    for template in TEMPLATES:
        words.update(w.strip(",") for w in template.split() if not w.startswith("{"))
    return sorted(words)


@dataclass(frozen=True)
class SyntheticImage:
    uid: str
    model: str
    jpeg: bytes


def _uid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _draw_object(draw: ImageDraw.ImageDraw, obj: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if obj in ("ball", "circle"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj in ("cube", "box"):
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj in ("triangle", "pyramid"):
        draw.polygon([(cx, cy - 1.2 * r), (cx - 1.3 * r, cy + r), (cx + 1.3 * r, cy + r)], fill=fill)
    else:  # diamond
        draw.polygon(
            [(cx, cy - 1.3 * r), (cx + 1.3 * r, cy), (cx, cy + 1.3 * r), (cx - 1.3 * r, cy)], fill=fill
        )


def render_image(
    rng: random.Random, obj: str, colour: str, caption_colour: str, washed_out: bool
) -> SyntheticImage:
    """One JPEG: grey background, a large `colour` object (washed out if asked), maybe a small distractor whose
    colour is neither `colour` nor `caption_colour`, so it never blurs the rule."""
    w, h = rng.choices(SIZES, weights=SIZE_WEIGHTS)[0]
    grey = rng.randint(70, 190)
    bg = tuple(max(0, min(255, grey + rng.randint(-10, 10))) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    side = min(w, h)
    if rng.random() < 0.5:  # distractor first, so the main object may cover part of it
        other = rng.choice([c for c in COLOURS if c not in (colour, caption_colour)])
        _draw_object(
            draw,
            rng.choice(OBJECTS),
            rng.uniform(0.1, 0.9) * w,
            rng.uniform(0.1, 0.9) * h,
            rng.uniform(0.06, 0.1) * side,
            COLOURS[other],
        )
    rgb = COLOURS[colour]
    fill = tuple((c + b) // 2 for c, b in zip(rgb, bg, strict=True)) if washed_out else rgb
    r = rng.uniform(0.33, 0.42) * side
    _draw_object(draw, obj, w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h, r, fill)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return SyntheticImage(uid=_uid(rng), model=rng.choice(MODELS), jpeg=buf.getvalue())


def _caption_pool(rng: random.Random, rows: int) -> list[tuple[str, str, str]]:
    """(caption, colour, object) triples; about one per 12 rows, so each caption spans several sessions."""
    size = max(4, rows // 12)
    return [
        (rng.choice(TEMPLATES).format(c=c, o=o), c, o)
        for c, o in ((rng.choice(list(COLOURS)), rng.choice(OBJECTS)) for _ in range(size))
    ]


def _render_with_defect(
    rng: random.Random, obj: str, caption_colour: str, defect: str | None
) -> SyntheticImage:
    """A flawless image (defect None) or one with a `DEFECTS` entry."""
    off_colour = defect in ("colour", "both")
    colour = rng.choice([c for c in COLOURS if c != caption_colour]) if off_colour else caption_colour
    return render_image(rng, obj, colour, caption_colour, washed_out=defect in ("contrast", "both"))


def generate_rows(
    rng: random.Random, rows: int, first_ranking_id: int, start: datetime
) -> tuple[list[dict], dict[int, str]]:
    """Rows of one split, session by session, following the Pick-a-Pic flow described in the module docstring,
    and each decided row's loser defect by ranking_id."""
    pool = _caption_pool(rng, rows)
    users = [rng.randint(10_000, 999_999) for _ in range(max(2, rows // 40))]
    out: list[dict] = []
    defects: dict[int, str] = {}
    clock = start
    while len(out) < rows:
        caption, colour, obj = rng.choice(pool)
        user = rng.choice(users)
        kept_defect = None if rng.random() < 0.5 else rng.choice(DEFECTS)
        kept = _render_with_defect(rng, obj, colour, kept_defect)
        for _ in range(min(rng.randint(2, 8), rows - len(out))):
            # ~9/10 of rows have a flawless kept image, and a tie needs two
            tie = kept_defect is None and rng.random() < TIE_FRACTION / 0.9
            challenger_defect = None if tie or kept_defect else rng.choice(DEFECTS)
            challenger = _render_with_defect(rng, obj, colour, challenger_defect)
            challenger_wins = challenger_defect is None and not tie
            preferred, other = (challenger, kept) if challenger_wins else (kept, challenger)
            first, second = (preferred, other) if rng.random() < 0.5 else (other, preferred)
            label_0 = 0.5 if tie else float(first is preferred)
            clock += timedelta(seconds=rng.randint(3, 60))
            ranking_id = first_ranking_id + len(out)
            if not tie:
                defects[ranking_id] = kept_defect if challenger_wins else challenger_defect
            out.append(
                {
                    "are_different": True,
                    "best_image_uid": "" if tie else preferred.uid,
                    "caption": caption,
                    "created_at": clock,
                    "has_label": True,
                    "image_0_uid": first.uid,
                    "image_0_url": f"https://images.pickapic.io/{first.uid}.png",
                    "image_1_uid": second.uid,
                    "image_1_url": f"https://images.pickapic.io/{second.uid}.png",
                    "jpg_0": first.jpeg,
                    "jpg_1": second.jpeg,
                    "label_0": label_0,
                    "label_1": 1.0 - label_0,
                    "model_0": first.model,
                    "model_1": second.model,
                    "ranking_id": ranking_id,
                    "user_id": user,
                    "num_example_per_prompt": 0,  # filled in below, once all rows of the split exist
                    "__index_level_0__": len(out),
                }
            )
            kept, kept_defect = preferred, None
    counts: dict[str, int] = {}
    for row in out:
        counts[row["caption"]] = counts.get(row["caption"], 0) + 1
    for row in out:
        row["num_example_per_prompt"] = counts[row["caption"]]
    return out, defects


def _write_split(rows: list[dict], defects: dict[int, str], split_dir: Path, rows_per_file: int) -> int:
    """Write `split_dir` aside and publish it with one rename; returns the number of files."""
    tmp = split_dir.with_name(f".{split_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from a killed run
    tmp.mkdir(parents=True)
    n_files = max(1, -(-len(rows) // rows_per_file))
    for i in range(n_files):
        chunk = rows[i * rows_per_file : (i + 1) * rows_per_file]
        table = pa.Table.from_pylist(chunk, schema=SCHEMA)
        pq.write_table(table, tmp / f"{split_dir.name}-{i:05d}-of-{n_files:05d}.parquet")
    (tmp / DEFECTS_FILE).write_text(json.dumps({str(k): v for k, v in defects.items()}, indent=0))
    publish_dir(tmp, split_dir)
    return n_files


def write_synthetic_dataset(
    out: Path, *, seed: int, rows: int, val_rows: int, rows_per_file: int = 400
) -> dict:
    """Write `out/train` and `out/validation`; ranking_id is unique across both splits."""
    if rows < 1 or val_rows < 0 or rows_per_file < 1:
        raise InputError(
            f"need rows >= 1, val_rows >= 0, rows_per_file >= 1 (got {rows}, {val_rows}, {rows_per_file})"
        )
    out = Path(out)
    rng = random.Random(seed)
    start = EPOCH + timedelta(days=seed % 365)
    summary: dict = {"out": str(out), "seed": seed}
    first_id = 1_000_000 + 10_000_000 * (seed % 100)
    for split, n in (("train", rows), ("validation", val_rows)):
        split_rows, defects = generate_rows(rng, n, first_id, start) if n else ([], {})
        first_id += n
        files = _write_split(split_rows, defects, out / split, rows_per_file)
        summary[split] = {
            "rows": n,
            "files": files,
            "ties": sum(r["label_0"] == 0.5 for r in split_rows),
            "captions": len({r["caption"] for r in split_rows}),
            "defects": {d: sum(v == d for v in defects.values()) for d in DEFECTS},
        }
        start = split_rows[-1]["created_at"] if split_rows else start
    return summary


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="dataset folder (train/ and validation/ parquet)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the dataset is a pure function of it (default: 0)"
    )
    parser.add_argument("--rows", type=int, required=True, help="train rows")
    parser.add_argument("--val-rows", type=int, default=0, help="validation rows (default: 0)")
    parser.add_argument("--rows-per-file", type=int, default=400, help="rows per parquet file (default: 400)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    t0 = time.perf_counter()
    try:
        s = write_synthetic_dataset(
            args.out, seed=args.seed, rows=args.rows, val_rows=args.val_rows, rows_per_file=args.rows_per_file
        )
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tr, va = s["train"], s["validation"]
    print(
        f"synthetic: {args.out} train {tr['rows']} rows/{tr['files']} files ({tr['ties']} ties, "
        f"{tr['captions']} captions), validation {va['rows']} rows/{va['files']} files ({va['ties']} ties), "
        f"seed {args.seed}, {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
