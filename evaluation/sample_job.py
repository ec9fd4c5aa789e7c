"""The sampler's Ray Data job: the images a run still lacks, made by one pipeline actor per GPU (per 2 CPUs without
GPUs), each PNG written aside and renamed by the actor that made it, its record published by the driver.

A record is published only after its PNG, so OUT/images.jsonl never names a missing image; a PNG whose record a
killed run did not publish yet is complete (renamed into place whole) and is adopted by the rerun, which makes only
the images that have no PNG.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.progress import RowProgress
from evaluation.layout import ImageRecord, publish_images
from schemas.atomic import atomic_write_bytes

# how often the driver merges the records of the images made since into OUT/images.jsonl
PUBLISH_S = 10.0


@dataclass(frozen=True)
class Sampling:
    """What every actor needs to make an image: the model, its pipeline settings, and where OUT is."""

    model: str
    unet: str | None
    lora: str | None
    scheduler: str
    steps: int
    guidance: float
    resolution: int
    dtype: str
    out: str


class PipelineActor:
    """A Ray Data actor: loads the policy (trainer.evaluate's `load_policy`: a UNet folder, a checkpoint, LoRA)
    into the base model's pipeline once, then turns batches of rows into PNGs under OUT."""

    def __init__(self, sampling: Sampling, num_threads: int) -> None:
        import torch

        from evaluation.pipelines import DTYPES, load_pipeline
        from trainer.evaluate import load_policy

        torch.set_num_threads(num_threads)
        dtype = DTYPES[sampling.dtype]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        policy = load_policy(sampling.model, sampling.unet, sampling.lora).policy
        policy.requires_grad_(False).eval().to(dtype)
        self.sampling = sampling
        self.pipe = load_pipeline(
            sampling.model, policy, scheduler=sampling.scheduler, dtype=dtype, device=device
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from evaluation.pipelines import generate, png_bytes

        s = self.sampling
        images = generate(
            self.pipe,
            list(batch["prompt"]),
            [int(seed) for seed in batch["seed"]],
            steps=s.steps,
            guidance=s.guidance,
            resolution=s.resolution,
        )
        for path, image in zip(batch["path"], images, strict=True):
            atomic_write_bytes(Path(s.out) / str(path), png_bytes(image))
        return batch


def record_of(row: dict[str, Any]) -> ImageRecord:
    prompt_id = row["prompt_id"]
    return ImageRecord(
        str(row["model"]),
        prompt_id if isinstance(prompt_id, str) else int(prompt_id),
        str(row["prompt"]),
        int(row["seed"]),
        str(row["path"]),
    )


def sample_missing(
    sampling: Sampling,
    todo: list[ImageRecord],
    progress: RowProgress,
    num_workers: int,
    batch_size: int,
    started_ray: bool,
) -> int:
    """Make the images of `todo` on the cluster Ray is connected to; returns how many were made."""
    import ray

    from cluster.ray_session import default_pool_size

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    workers = num_workers or default_pool_size(resources, os.cpu_count() if started_ray else None)
    rows = [
        {"model": r.model, "prompt_id": r.prompt_id, "prompt": r.prompt, "seed": r.seed, "path": r.path}
        for r in todo
    ]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size))).map_batches(
        PipelineActor,
        batch_size=batch_size,
        fn_constructor_kwargs={"sampling": sampling, "num_threads": 2},
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows))),
        **({"num_gpus": 1} if gpus else {"num_cpus": 1}),
    )
    made, pending, last = 0, [], time.monotonic()
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pandas"):
            pending += [record_of(row) for row in batch.to_dict("records")]
            made += len(batch)
            progress.update(progress.first + made)
            if time.monotonic() - last >= PUBLISH_S:
                publish_images(sampling.out, pending)
                pending, last = [], time.monotonic()
    finally:
        # also on Ctrl-C or a failed actor: the images made so far are kept
        publish_images(sampling.out, pending)
    progress.update(progress.first + made, final=True)
    return made
