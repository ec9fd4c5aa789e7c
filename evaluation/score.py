"""Score every image of an evaluation folder with reward models: OUT/images.jsonl → OUT/scores.jsonl.

CLI: python -m evaluation.score --images OUT --scorer NAME[=ARG] [--scorer ...] [--batch-size N] [--device DEV]
     [--ray | --ray-address ADDR] [--num-workers N]

Scorers (evaluation/scorers/): pickscore[=MODEL], hps[=v2.0|v2.1|PATH], clip[=MODEL], aesthetic=MLP, rule; ARG is
a local file or folder, or a hub id found in (or downloaded to) the Hugging Face cache. Each score record is
(model, prompt_id, seed, scorer, version, score, weights). A rerun scores only the images OUT/scores.jsonl lacks for
that scorer and version; new scores are published every FLUSH_S seconds and at the end (merged under a lock, written
aside, renamed), so a killed run loses at most its last interval and two runs on one OUT lose nothing.
The scorers run one after the other: here, on --device (default: cuda when there is one), or with --ray as a Ray
Data job of scorer actors, one per GPU (one per 2 CPUs without GPUs), on a local cluster or the one at --ray-address /
RAY_ADDRESS; each scorer is a callable class over a batch (evaluation/scorers/base.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
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
    parser.add_argument(
        "--device",
        default=None,
        help="torch device of an in-process run (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="score as Ray Data actors, one per GPU (a local cluster or RAY_ADDRESS)",
    )
    parser.add_argument("--ray-address", help="score as Ray Data actors on this cluster (implies --ray)")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="scorer actors with --ray (default 0: one per GPU, else per 2 CPUs)",
    )
    return parser


def check_images(out: Path, images: list[ImageRecord]) -> None:
    """Every listed PNG exists, before any model loads."""
    for r in images:
        if not (out / r.path).is_file():
            raise InputError(
                f"{out / IMAGES_FILE}: the image of model {r.model}, prompt_id {r.prompt_id}, seed {r.seed} "
                f"({r.path}) does not exist"
            )


def columns(out: Path, batch: list[ImageRecord]) -> dict[str, np.ndarray]:
    """A scorer's batch: the PNG files and their prompts."""
    return {
        "path": np.array([str(out / r.path) for r in batch]),
        "prompt": np.array([r.prompt for r in batch]),
    }


def in_process(
    out: Path, todo: list[ImageRecord], source: scorers.Source, batch_size: int, device: str | None
) -> Iterator[tuple[list[ImageRecord], np.ndarray]]:
    """(images, their scores) batch by batch, from the scorer loaded here."""
    scorer = scorers.load(source, device)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        yield batch, scorer(columns(out, batch))["score"]


def on_ray(
    out: Path,
    todo: list[ImageRecord],
    source: scorers.Source,
    batch_size: int,
    workers: int,
    started_ray: bool,
) -> Iterator[tuple[list[ImageRecord], np.ndarray]]:
    """(images, their scores) as a Ray Data job of scorer actors: one per GPU (else one per 2 CPUs, or
    `workers`), each loading the weights once; batches come back in the order they finish."""
    import ray

    from cluster.ray_session import default_pool_size

    resources = ray.cluster_resources()
    size = workers or default_pool_size(resources, os.cpu_count() if started_ray else None)
    # an index column, not the records: prompt ids may be ints and strings, which one Arrow column cannot mix;
    # absolute paths: the actors' working directory is not this one
    rows = [{"i": i, "path": str(out.resolve() / r.path), "prompt": r.prompt} for i, r in enumerate(todo)]
    dataset = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // batch_size)).map_batches(
        scorers.SCORERS[source.name],
        fn_constructor_args=(source,),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=min(size, len(rows))),
        **({"num_gpus": 1} if resources.get("GPU") else {"num_cpus": 1}),
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        yield [todo[int(i)] for i in batch["i"]], batch["score"]


def missing(out: Path, images: list[ImageRecord], source: scorers.Source) -> list[ImageRecord]:
    """The images OUT/scores.jsonl has no score of `source` (name and version) for."""
    done = {r.key for r in read_scores(out) if (r.scorer, r.version) == (source.name, source.version)}
    return [r for r in images if (*r.key, source.name, source.version) not in done]


def score_with(
    out: Path,
    images: list[ImageRecord],
    source: scorers.Source,
    args: argparse.Namespace,
    started_ray: bool | None,
) -> int:
    """Score the images that lack a score of `source` (on Ray when `started_ray` is not None); returns how many were
    scored."""
    from tqdm import tqdm

    todo = missing(out, images, source)
    label = f"{source.name} {source.version}"
    if not todo:
        print(f"score: {label}: all {len(images)} images already scored")
        return 0
    t0 = time.perf_counter()
    if started_ray is None:
        batches = in_process(out, todo, source, args.batch_size, args.device)
    else:
        batches = on_ray(out, todo, source, args.batch_size, args.num_workers, started_ray)
    print(f"score: {label}: {len(todo)} of {len(images)} images to score ({source.weights})", flush=True)
    pending: list[ScoreRecord] = []
    last_flush = time.monotonic()
    progress = tqdm(total=len(todo), desc=f"score {source.name}", unit="img", file=sys.stderr)
    try:
        for batch, scores in batches:
            pending += [
                ScoreRecord(
                    r.model, r.prompt_id, r.seed, source.name, source.version, float(s), source.weights
                )
                for r, s in zip(batch, scores, strict=True)
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
    if args.num_workers < 0:
        raise InputError(f"--num-workers {args.num_workers}: must be at least 0")
    sources = list({(s.name, s.version): s for s in map(scorers.resolve, args.scorer)}.values())
    # a finished run starts no cluster
    if not (args.ray or args.ray_address) or not any(missing(out, images, s) for s in sources):
        return {f"{s.name} {s.version}": score_with(out, images, s, args, None) for s in sources}
    from cluster.ray_session import ray_session

    with ray_session(args.ray_address) as started_ray:
        return {f"{s.name} {s.version}": score_with(out, images, s, args, started_ray) for s in sources}


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    return run_cli(lambda: run(args), "score: interrupted; the same command scores what is still missing")


if __name__ == "__main__":
    sys.exit(main())
