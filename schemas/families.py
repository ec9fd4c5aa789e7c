"""What differs between the model families, stated once: the encode reads which text encoders run and what they
return, the trainer which denoiser it trains, how it is noised and conditioned, and what it exports.

A family is recognised by its diffusers pipeline class (`model_index.json` `_class_name`), so any folder in that
layout works whatever its widths, depths or vocabularies. Adding a family is one entry here plus its forward in
trainer/denoisers.py (and its settings in schemas/loss_table.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# the DDPM noise of the SD UNets (epsilon or v target, as the scheduler config says), and rectified flow
DDPM, FLOW = "ddpm", "flow"


@dataclass(frozen=True)
class Family:
    name: str
    # the diffusers pipeline class: recognises a folder, loads its parts, saves and loads its LoRA weights
    pipeline: str
    # the subfolder of the trained network, and its diffusers class
    denoiser: str
    denoiser_class: str
    noise: str
    # the text sample's tensors, as the pipeline's encode_prompt names them
    text_tensors: tuple[str, ...]
    # T5 tokens per caption, the pipeline's encode_prompt default (None: CLIP's 77 only)
    max_sequence_length: int | None
    # LoRA's target modules, as the family's diffusers training script adapts them
    lora_targets: tuple[str, ...]
    # SDXL's micro-conditioning: each image's original size and crop (the stored time ids)
    time_ids: bool = False
    # FLUX: latents packed into 2×2 patch tokens with image ids, and a guidance input when the model has one
    packed: bool = False

    @property
    def is_flow(self) -> bool:
        return self.noise == FLOW


_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "sd15",
            "StableDiffusionPipeline",
            "unet",
            "UNet2DConditionModel",
            DDPM,
            ("prompt_embeds",),
            None,
            _ATTENTION,
        ),
        Family(
            "sdxl",
            "StableDiffusionXLPipeline",
            "unet",
            "UNet2DConditionModel",
            DDPM,
            ("prompt_embeds", "pooled_prompt_embeds"),
            None,
            _ATTENTION,
            time_ids=True,
        ),
        # diffusers train_dreambooth_lora_sd3.py's default targets: the image and the context stream's attention
        Family(
            "sd3",
            "StableDiffusion3Pipeline",
            "transformer",
            "SD3Transformer2DModel",
            FLOW,
            ("prompt_embeds", "pooled_prompt_embeds"),
            256,
            (*_ATTENTION, "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"),
        ),
        # diffusers train_dreambooth_lora_flux.py's default targets
        Family(
            "flux",
            "FluxPipeline",
            "transformer",
            "FluxTransformer2DModel",
            FLOW,
            ("prompt_embeds", "pooled_prompt_embeds"),
            512,
            _ATTENTION,
            packed=True,
        ),
    )
}
MODEL_FAMILIES = tuple(FAMILIES)
_BY_PIPELINE = {family.pipeline: family.name for family in FAMILIES.values()}


def family_of_index(index: dict) -> str | None:
    """The family of a `model_index.json`, by its pipeline class; None for a pipeline this project does not train."""
    return _BY_PIPELINE.get(str(index.get("_class_name", "")))


def folder_family(folder: Path) -> str:
    """A local folder's family: its model_index.json's pipeline; without one (a folder holding only a denoiser, as
    `--unet DIR/final/unet` is), the denoiser's own config: SDXL's UNet takes pooled text and time ids
    (addition_embed_type "text_time"), a transformer names its class."""
    index = folder / "model_index.json"
    if index.is_file():
        family = family_of_index(json.loads(index.read_text()))
        if family is not None:
            return family
    for config_path in (
        folder / "config.json",
        folder / "unet" / "config.json",
        folder / "transformer" / "config.json",
    ):
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            for family in FAMILIES.values():
                if family.denoiser == "transformer" and config.get("_class_name") == family.denoiser_class:
                    return family.name
            if config.get("addition_embed_type") == "text_time":
                return "sdxl"
    return "sdxl" if (folder / "text_encoder_2").is_dir() else "sd15"
