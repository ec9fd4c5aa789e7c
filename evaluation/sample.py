"""Sample a model on a prompt set into an evaluation folder: OUT/<name>/<prompt_id>_<seed>.png and OUT/images.jsonl.

CLI: python -m evaluation.sample --model BASE [--unet DIR | --lora DIR] --name NAME --prompts FILE --out OUT
     [--images-per-prompt K] [--seed S] [--resolution R] [--steps N] [--guidance G] [--scheduler NAME]
     [--preset dpo|sdpo] [--dtype fp32|fp16|bf16] [--dedup] [--batch-size B] [--num-workers N] [--ray-address ADDR]

Image j of prompt i is drawn from a generator seeded `image_seed(S, i, j)` (evaluation/pipelines.py), the seed its
record carries, so every model sampled into one OUT with one S pairs up image by image. A preset is a published
protocol (`dpo`: DiffusionDPO's notebook, `sdpo`: Diffusion-SDPO's scripts); flags override it, and every setting
is recorded in OUT/<name>/settings.json. A rerun makes only the images that are missing (a finished run is a no-op);
a rerun with other image settings under the same name is refused. Runs as a Ray Data job on a local cluster, or the
one at --ray-address / RAY_ADDRESS (evaluation/sample_job.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.cli import run_cli
from evaluation.layout import (
    IMAGES_FILE,
    MODEL_NAME,
    SETTINGS_FILE,
    ImageRecord,
    image_path,
    publish_images,
    read_images,
    read_settings,
    write_settings,
)
from evaluation.pipelines import (
    DTYPES,
    SCHEDULERS,
    default_resolution,
    image_seed,
    scheduler_class,
)
from evaluation.prompts import read_prompts
from evaluation.sample_job import Sampling
from schemas.errors import InputError
from schemas.model_folder import pipeline_parts, resolve_model


@dataclass(frozen=True)
class Preset:
    """A published sampling protocol, per family: a family it has no entry for is refused under it."""

    scheduler: str
    # per family
    steps: dict[str, int]
    guidance: dict[str, float]
    # per family; None: the pipeline's default (512 SD1.5, 1024 SDXL)
    resolution: dict[str, int] | None
    # on GPUs; CPU workers sample in fp32
    dtype: str
    source: str


PRESETS = {
    # SD3/FLUX: their diffusers pipelines' own defaults (StableDiffusion3Pipeline and FluxPipeline __call__: 28 steps,
    # guidance 7.0 and 3.5), as no DPO paper on them publishes a sampling protocol
    "dpo": Preset(
        "default",
        {"sd15": 50, "sdxl": 50, "sd3": 28, "flux": 28},
        {"sd15": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 3.5},
        None,
        "fp16",
        "DiffusionDPO quick_samples.ipynb; SD3/FLUX: the diffusers pipelines' defaults",
    ),
    # Diffusion-SDPO writes CFG 7.5 as cond + 7.5·(cond − uncond): diffusers' guidance_scale 8.5
    "sdpo": Preset(
        "euler",
        {"sd15": 50, "sdxl": 50},
        {"sd15": 8.5, "sdxl": 8.5},
        {"sd15": 512, "sdxl": 1024},
        "bf16",
        "Diffusion-SDPO test_sd1{5,xl}.py",
    ),
}
# settings that change an image: a rerun under the same name must have the same
IMAGE_SETTINGS = ("model", "unet", "lora", "scheduler", "steps", "guidance", "resolution", "dtype", "seed")


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        required=True,
        help="base model folder or hub id (an SD1.5, SDXL, SD3/SD3.5 or FLUX.1 pipeline)",
    )
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument(
        "--unet",
        "--transformer",
        dest="unet",
        help="a trained denoiser folder (RUN/final/unet, RUN/final/transformer) or a checkpoint "
        "(RUN/checkpoints/step_N)",
    )
    policy.add_argument("--lora", help="a LoRA folder saved by the trainer (RUN/final/lora)")
    parser.add_argument(
        "--name", required=True, help="the model's name in OUT (a folder of OUT; e.g. base, dpo)"
    )
    parser.add_argument(
        "--prompts",
        required=True,
        help="text (a prompt a line), JSON list, or FILE.parquet:COLUMN / FILE.csv:COLUMN",
    )
    parser.add_argument("--out", type=Path, required=True, help="evaluation folder OUT")
    parser.add_argument("--images-per-prompt", type=int, default=1, help="images of each prompt (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (default: 0)")
    parser.add_argument("--preset", choices=PRESETS, default="dpo", help="published protocol (default: dpo)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the preset's)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the preset's, 50)")
    parser.add_argument("--guidance", type=float, help="diffusers guidance_scale (default: the preset's)")
    parser.add_argument(
        "--scheduler", help=f"{', '.join(SCHEDULERS)} or a diffusers scheduler class (default: the preset's)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, help="weights' dtype (default: the preset's on GPUs, fp32 on CPU workers)"
    )
    parser.add_argument("--dedup", action="store_true", help="each distinct prompt once")
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default: 4)")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="pipeline actors (default 0: one per GPU, else one per 2 CPUs)",
    )
    parser.add_argument(
        "--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local one)"
    )
    parser.add_argument("--verbose", action="store_true", help="Ray's own logs and progress bars")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag, value, least in (
        ("--images-per-prompt", args.images_per_prompt, 1),
        ("--steps", args.steps, 1),
        ("--batch-size", args.batch_size, 1),
        ("--num-workers", args.num_workers, 0),
        ("--seed", args.seed, 0),
    ):
        if value is not None and value < least:
            raise InputError(f"{flag} {value}: must be at least {least}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise InputError(
            f"--resolution {args.resolution}: must be a positive multiple of 8 (the VAE's factor)"
        )
    if args.guidance is not None and args.guidance < 0:
        raise InputError(f"--guidance {args.guidance}: must be at least 0")
    if not MODEL_NAME.fullmatch(args.name):
        raise InputError(f"--name {args.name!r}: letters, digits and . _ + - only, not starting with . _ + -")


def settings_of(args: argparse.Namespace, num_prompts: int) -> dict[str, Any]:
    """Every setting of the run, the preset's where no flag overrides it; `dtype` None until the cluster is known."""
    from trainer.evaluate import check_policy_dirs

    folder = resolve_model(args.model, pipeline_parts)
    if not (folder.path / "model_index.json").is_file():
        raise InputError(f"--model {args.model}: not a diffusers pipeline folder (no model_index.json)")
    family = folder.family.name
    check_policy_dirs(args.unet, args.lora, family)
    preset = PRESETS[args.preset]
    if family not in preset.steps:
        raise InputError(
            f"--preset {args.preset}: defined for {', '.join(preset.steps)} only (its source: {preset.source}); "
            f"--model {args.model} is a {family} pipeline: use --preset dpo (its pipeline's defaults)"
        )
    scheduler = args.scheduler or preset.scheduler
    scheduler_class(scheduler)
    resolution = args.resolution or (preset.resolution or {}).get(family) or default_resolution(args.model)
    local = Path(args.model).exists()
    return {
        "model": str(Path(args.model).resolve()) if local else args.model,
        "family": family,
        "unet": str(Path(args.unet).resolve()) if args.unet else None,
        "lora": str(Path(args.lora).resolve()) if args.lora else None,
        "preset": args.preset,
        "preset_source": preset.source,
        "scheduler": scheduler,
        "steps": args.steps or preset.steps[family],
        "guidance": args.guidance if args.guidance is not None else preset.guidance[family],
        "resolution": resolution,
        "dtype": args.dtype,
        "seed": args.seed,
        "images_per_prompt": args.images_per_prompt,
        "prompts": args.prompts,
        "dedup": args.dedup,
        "num_prompts": num_prompts,
        "negative_prompt": None,
        "safety_checker": None,
        "generator": "one CPU torch.Generator per image, seeded image_seed(seed, prompt_id, j)",
    }


def check_same_images(out: Path, name: str, settings: dict[str, Any]) -> None:
    """Refuse a run whose images would not be those `name` already has in OUT (dtype once it is known)."""
    saved = read_settings(out, name)
    if saved is None:
        return
    keys = [k for k in IMAGE_SETTINGS if k != "dtype" or settings["dtype"] is not None]
    diffs = [f"{k}: {saved.get(k)!r} there, {settings[k]!r} now" for k in keys if saved.get(k) != settings[k]]
    if diffs:
        raise InputError(
            f"--name {name}: {out / name} was sampled with other settings ({'; '.join(diffs)}); sample under "
            "another --name, or into another --out"
        )


def planned(name: str, prompts: list[tuple[int, str]], seed: int, k: int) -> list[ImageRecord]:
    """The records of every image the run is asked for, prompt by prompt."""
    return [
        ImageRecord(name, i, prompt, s, image_path(name, i, s))
        for i, prompt in prompts
        for s in (image_seed(seed, i, j) for j in range(k))
    ]


def run(args: argparse.Namespace) -> int:
    """Returns how many images this run made."""
    from cluster.progress import RowProgress
    from cluster.ray_session import ray_session
    from evaluation.sample_job import sample_missing
    from schemas.dir_lock import DirLock

    check_args(args)
    prompts = read_prompts(args.prompts, args.dedup)
    settings = settings_of(args, len(prompts))
    out, name = args.out, args.name
    check_same_images(out, name, settings)
    wanted = planned(name, prompts, args.seed, args.images_per_prompt)
    listed = {r.key for r in read_images(out)} if (out / IMAGES_FILE).is_file() else set()
    if all(r.key in listed for r in wanted):
        print(f"sample: {name}: all {len(wanted)} images already in {out / IMAGES_FILE}")
        return 0
    with DirLock(
        out / name, ".sample.lock", lambda holder: f"--out {out}: {name} is being sampled ({holder})"
    ):
        # a killed run's PNGs are whole (renamed into place): their records are all they lack
        adopted = [r for r in wanted if r.key not in listed and (out / r.path).is_file()]
        publish_images(out, adopted)
        todo = [r for r in wanted if r.key not in listed and not (out / r.path).is_file()]
        done = len(wanted) - len(todo)
        if not todo:
            print(f"sample: {name}: {len(adopted)} images of an interrupted run listed, none to make")
            return 0
        with ray_session(args.ray_address, args.verbose) as started_ray:
            import ray

            gpus = ray.cluster_resources().get("GPU", 0)
            settings["dtype"] = args.dtype or (PRESETS[args.preset].dtype if gpus else "fp32")
            check_same_images(out, name, settings)
            write_settings(out, name, settings)
            sampling = Sampling(
                settings["model"],
                settings["unet"],
                settings["lora"],
                settings["scheduler"],
                settings["steps"],
                settings["guidance"],
                settings["resolution"],
                settings["dtype"],
                # the actors' working directory is not this one
                str(out.resolve()),
            )
            progress = RowProgress(len(wanted), done=done, label="sample", unit="images")
            progress.print(
                f"sample: {name}: {len(todo)} of {len(wanted)} images to make ({len(prompts)} prompts × "
                f"{args.images_per_prompt}, {settings['resolution']}px, {settings['steps']} steps, "
                f"{settings['scheduler']}, guidance {settings['guidance']}, {settings['dtype']}; "
                f"settings in {out / name / SETTINGS_FILE})"
            )
            started = time.perf_counter()
            made = sample_missing(sampling, todo, progress, args.num_workers, args.batch_size, started_ray)
    print(f"sample: {name}: {made} images in {time.perf_counter() - started:.1f}s → {out / IMAGES_FILE}")
    return made


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    return run_cli(lambda: run(args), "sample: interrupted; the same command makes the images still missing")


if __name__ == "__main__":
    sys.exit(main())
