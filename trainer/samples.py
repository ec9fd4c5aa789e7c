"""Images of the policy while it trains (--sample-every N --sample-prompts FILE), as every peer trainer shows them.

At step 0 (the reference: the policy before any update) and every N optimizer steps, the main process generates one
image per prompt, the prompts' grid goes to DIR/samples/step_N.png (published by rename) and, with --report-to
tensorboard, to the tracker as the image `samples`; the other processes wait. A resumed run skips the steps whose
grid exists.

Why it cannot change the run: the images come from evaluation.pipelines.generate, whose noise is a CPU generator per
image seeded from (--seed, prompt index, 0), never torch's global generator, and the global generators (CPU and
accelerator) are forked around it anyway, so a pipeline that drew from them would leave the training's draws as they
were. The pipeline shares the policy's modules (no copy) and runs under no_grad, so no gradient or weight is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from schemas.atomic import atomic_write_bytes
from schemas.config import TrainConfig
from schemas.errors import InputError
from schemas.manifest import Manifest

SAMPLES_DIR = "samples"
# the families training-time sampling is tested on (evaluation.sample also samples SD3/FLUX)
SAMPLED_FAMILIES = ("sd15", "sdxl")
# DiffusionDPO's sampling settings: the pipeline's own scheduler, 50 steps, its CFG per family
PRESET = "dpo"


def grid(images: list[Image.Image]) -> Image.Image:
    """The images in rows of ceil(√n), in prompt order."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    return sheet


@dataclass
class TrainingSamples:
    """The sampling component of one run: `TrainingSamples.from_config(cfg)` checks --sample-prompts before any
    work; `maybe(trainer, step)` after each step decides whether this step samples."""

    cfg: TrainConfig
    prompts: list[str]
    _pipe: Any = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> TrainingSamples:
        if not cfg.sample_every:
            return cls(cfg, [])
        from evaluation.prompts import read_prompts

        family = Manifest.load(cfg.data).model_family
        if family not in SAMPLED_FAMILIES:
            raise InputError(f"--sample-every: sampling supports {', '.join(SAMPLED_FAMILIES)}, not {family}")
        try:
            prompts = [text for _, text in read_prompts(cfg.sample_prompts)]
        except InputError as e:
            raise InputError(str(e).replace("--prompts", "--sample-prompts", 1)) from None
        return cls(cfg, prompts)

    def due(self, step: int) -> bool:
        return bool(self.prompts) and step % self.cfg.sample_every == 0

    def path(self, step: int) -> Path:
        return Path(self.cfg.output_dir) / SAMPLES_DIR / f"step_{step}.png"

    def maybe(self, trainer: Any, step: int) -> None:
        """Sample at `step` when it is due and its grid is not there yet (main process; every process waits)."""
        if not self.due(step):
            return
        accelerator = trainer.accelerator
        if accelerator.is_main_process and not self.path(step).exists():
            devices = [accelerator.device] if accelerator.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                sheet = self.sample(trainer)
            from evaluation.pipelines import png_bytes

            atomic_write_bytes(self.path(step), png_bytes(sheet))
            if self.cfg.report_to in ("tensorboard", "all"):
                writer = accelerator.get_tracker("tensorboard", unwrap=True)
                writer.add_image(SAMPLES_DIR, np.asarray(sheet), global_step=step, dataformats="HWC")
        accelerator.wait_for_everyone()

    def sample(self, trainer: Any) -> Image.Image:
        from evaluation.pipelines import generate, image_seed, load_pipeline
        from evaluation.sample import PRESETS

        preset = PRESETS[PRESET]

        if self._pipe is None:
            self._pipe = load_pipeline(
                self.cfg.model,
                trainer.models.policy,
                scheduler=preset.scheduler,
                device=trainer.accelerator.device,
            )
        resolution = Manifest.load(self.cfg.data).resolution
        seeds = [image_seed(self.cfg.seed, i, 0) for i in range(len(self.prompts))]
        with trainer.accelerator.autocast():
            images = generate(
                self._pipe,
                self.prompts,
                seeds,
                steps=preset.steps[trainer.family],
                guidance=preset.guidance[trainer.family],
                resolution=resolution,
            )
        return grid(images)
