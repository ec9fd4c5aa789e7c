"""Score every image of an evaluation folder with reward models: OUT/images.jsonl → OUT/scores.jsonl.

CLI: python -m evaluation.score --images OUT --scorer NAME[=ARG] [--scorer ...] [--batch-size N] [--device DEV]

Scorers (evaluation/scorers/): pickscore[=MODEL], hps[=v2.0|v2.1|PATH], clip[=MODEL], aesthetic=MLP, rule; ARG is
a local file or folder, or a hub id found in (or downloaded to) the Hugging Face cache. Each score record is
(model, prompt_id, seed, scorer, version, score, weights). A rerun scores only the images OUT/scores.jsonl lacks for
that scorer and version; new scores are published every FLUSH_S seconds and at the end (merged under a lock, written
aside, renamed), so a killed run loses at most its last interval and two runs on one OUT lose nothing.
The scorers run here, one after the other, on --device (default: cuda when there is one); each is a callable class
over a batch (evaluation/scorers/base.py), ready to run as Ray Data actors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from evaluation import scorers
from evaluation.cli import run_cli
from evaluation.layout import (
    IMAGES_FILE,
    SCORES_FILE,
    ImageRecord,
    ScoreRecord,
    publish_scores,
    read_images,
    read_scores,
)
from schemas.errors import InputError

FLUSH_S = 30.0


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--images", type=Path, required=True, help="evaluation folder OUT (holds images.jsonl)"
    )
    parser.add_argument(
        "--scorer",
        action="append",
        required=True,
        metavar="NAME[=ARG]",
        help=f"a scorer, repeatable: {', '.join(scorers.SCORERS)} (see the module docstring for ARG)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per scorer call (default: 16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def check_images(out: Path, images: list[ImageRecord]) -> None:
    """Every listed PNG exists, before any model loads."""
    for r in images:
        if not (out / r.path).is_file():
            raise InputError(
                f"{out / IMAGES_FILE}: the image of model {r.model}, prompt_id {r.prompt_id}, seed {r.seed} "
                f"({r.path}) does not exist"
            )


def score_with(
    out: Path, images: list[ImageRecord], source: scorers.Source, batch_size: int, device: str | None
) -> int:
    """Score the images that lack a score of `source`; returns how many were scored."""
    from tqdm import tqdm

    done = {r.key for r in read_scores(out) if (r.scorer, r.version) == (source.name, source.version)}
    todo = [r for r in images if (*r.key, source.name, source.version) not in done]
    label = f"{source.name} {source.version}"
    if not todo:
        print(f"score: {label}: all {len(images)} images already scored")
        return 0
    t0 = time.perf_counter()
    scorer = scorers.load(source, device)
    print(f"score: {label}: {len(todo)} of {len(images)} images to score ({source.weights})", flush=True)
    pending: list[ScoreRecord] = []
    last_flush = time.monotonic()
    progress = tqdm(total=len(todo), desc=f"score {source.name}", unit="img", file=sys.stderr)
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            result = scorer(
                {
                    "path": np.array([str(out / r.path) for r in batch]),
                    "prompt": np.array([r.prompt for r in batch]),
                }
            )
            pending += [
                ScoreRecord(
                    r.model, r.prompt_id, r.seed, source.name, source.version, float(s), source.weights
                )
                for r, s in zip(batch, result["score"], strict=True)
            ]
            progress.update(len(batch))
            if time.monotonic() - last_flush >= FLUSH_S:
                publish_scores(out, pending)
                pending, last_flush = [], time.monotonic()
    finally:
        progress.close()
        publish_scores(out, pending)  # also on Ctrl-C: what was scored is kept
    print(f"score: {label}: {len(todo)} images in {time.perf_counter() - t0:.1f}s → {out / SCORES_FILE}")
    return len(todo)


def run(args: argparse.Namespace) -> dict[str, int]:
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: must be at least 1")
    out = args.images
    images = read_images(out)
    if not images:
        raise InputError(f"{out / IMAGES_FILE}: lists no images")
    check_images(out, images)
    # every scorer is resolved (files found or downloaded, version known) before the first one loads
    sources = list({(s.name, s.version): s for s in map(scorers.resolve, args.scorer)}.values())
    return {
        f"{s.name} {s.version}": score_with(out, images, s, args.batch_size, args.device) for s in sources
    }


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    return run_cli(lambda: run(args), "score: interrupted; the same command scores what is still missing")


if __name__ == "__main__":
    sys.exit(main())
