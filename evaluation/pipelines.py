"""A diffusers text-to-image pipeline of a base model with a trained denoiser in it, and images from it whose noise
depends only on (seed, prompt id, image index): the sampler's and the trainer's one way to generate.

Why one generator per image: diffusers draws an image's initial latents (and an ancestral scheduler's per-step noise)
from the generator given for that image, so image j of prompt i gets the same noise whatever batch, order, number of
workers or model it is made with; every model sampled with one seed is then paired image by image, and a rerun on
the same machine gives the same PNG bytes. The generators are on the CPU, so the noise is the same on any device.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from schemas.errors import InputError
from schemas.families import FAMILIES, Family
from schemas.sample import model_family
from schemas.seeds import seed_of

# --scheduler's short names (SimpleTuner's and kohya's spellings) → diffusers classes; "default": the base model's
# own scheduler/ (PNDM for SD1.5, EulerDiscrete for SDXL-base: what DiffusionDPO's notebook samples with)
SCHEDULERS: dict[str, str | None] = {
    "default": None,
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# keeps image seeds apart from every other seed_of stream (data, training noise, evaluation draws)
_IMAGE_DOMAIN = 0x494D414745


def image_seed(seed: int, prompt_id: int | str, j: int) -> int:
    """The seed of image `j` of prompt `prompt_id` in a run seeded `seed`: what its generator is seeded with and
    what OUT/images.jsonl records. 63 bits, so it fits a signed 64-bit column too."""
    return seed_of(_IMAGE_DOMAIN, seed, prompt_id, j) >> 1


def scheduler_class(name: str) -> str | None:
    """The diffusers scheduler class of `--scheduler NAME` (a short name or a class name); None for the model's own."""
    import diffusers

    if name in SCHEDULERS:
        return SCHEDULERS[name]
    if name.endswith("Scheduler") and hasattr(diffusers, name):
        return name
    raise InputError(
        f"--scheduler {name}: not one of {', '.join(SCHEDULERS)} nor a diffusers scheduler class (e.g. DDIMScheduler)"
    )


def family_of(model: str | Path) -> Family:
    """The family of a base model folder or hub id; only families with a text-to-image pipeline here."""
    return FAMILIES[model_family(model)]


def _part_config(model: str | Path, part: str) -> dict[str, Any]:
    """`part`/config.json of a local folder, or of a hub id (the Hugging Face cache, or fetched)."""
    path = Path(model) / part / "config.json"
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(model), "config.json", subfolder=part))
    return json.loads(path.read_text())


# FluxPipeline's default_sample_size: FluxTransformer2DModel's config has no sample_size
_FLUX_SAMPLE_SIZE = 128


def default_resolution(model: str | Path) -> int:
    """The pipeline's default image side: the denoiser's sample_size × the VAE's downsampling (512 SD1.5, 1024 SDXL,
    SD3.5 and FLUX.1)."""
    family = family_of(model)
    vae_factor = 2 ** (len(_part_config(model, "vae")["block_out_channels"]) - 1)
    sample_size = _part_config(model, family.denoiser).get("sample_size", _FLUX_SAMPLE_SIZE)
    return int(sample_size) * vae_factor


def load_pipeline(
    model: str | Path,
    denoiser: torch.nn.Module | None = None,
    *,
    scheduler: str = "default",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Any:
    """The family's diffusers pipeline of the base `model` (from_pretrained), with `denoiser` (a UNet or a
    transformer, LoRA-injected or not) in place of the base's, `scheduler` (a --scheduler name) built from the base's scheduler config, on
    `device`. The parts loaded here get `dtype`; `denoiser` is used as it is, so give it the same dtype (a training
    policy stays where it is). No safety checker, no progress bar."""
    import diffusers

    family = family_of(model)
    parts: dict[str, Any] = {"torch_dtype": dtype}
    if denoiser is not None:
        parts[family.denoiser] = denoiser
    if family.name == "sd15":
        parts.update(safety_checker=None, requires_safety_checker=False)
    pipe = getattr(diffusers, family.pipeline).from_pretrained(model, **parts)
    cls = scheduler_class(scheduler)
    if cls is not None:
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    resolution: int | None = None,
) -> list[Any]:
    """One PIL image per (prompt, seed), in one pipeline call: image i's noise comes from its own CPU generator
    seeded `seeds[i]` (`image_seed`), nothing from torch's global generator. `resolution`: the side in pixels
    (default: the pipeline's)."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return pipe(
        prompt=list(prompts),
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=resolution,
        width=resolution,
        generator=generators,
        output_type="pil",
    ).images


def png_bytes(image: Any) -> bytes:
    """An image as PNG with no metadata: the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
