"""PickScore: CLIP-H fine-tuned on Pick-a-Pic, scored as its model card does, `logit_scale.exp()` x cosine.

The card loads the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (not of the PickScore repo) and the model with
AutoModel (a CLIPModel); so does this, with the image processor's PIL backend (see base.clip_image_processor).
Diffusion-DPO's utils report the bare cosine; this is the card's score, 100x its scale for PickScore's weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from evaluation.scorers.base import (
    LAION_CLIP_H,
    PROCESSOR_FILES,
    Scorer,
    Source,
    clip_image_processor,
    describe,
    has_files,
    locate,
    pooled,
    require,
)
from schemas.errors import InputError

WEIGHT_FILES = ["model.safetensors", "pytorch_model.bin"]


class PickScore(Scorer):
    """`pickscore` (yuvalkirstain/PickScore_v1) or `pickscore=PATH`: a transformers CLIPModel folder or hub repo;
    a local folder that also holds a processor (preprocessor_config.json + tokenizer) uses it, any other gets LAION's."""

    name = "pickscore"
    default = "yuvalkirstain/PickScore_v1"

    @classmethod
    def resolve(cls, arg: str | None) -> Source:
        arg = arg or cls.default
        folder = locate(cls.name, arg, ["config.json", WEIGHT_FILES[0]], "model")
        if not folder.is_dir():
            raise InputError(f"--scorer pickscore={arg}: {folder} is a file; pass the model folder")
        local = Path(arg).exists()
        if not local and not (folder / WEIGHT_FILES[0]).is_file():
            folder = locate(cls.name, arg, ["config.json", WEIGHT_FILES[1]], "model")  # a repo of .bin only
        require(cls.name, folder, ["config.json"], "model config")
        require(cls.name, folder, WEIGHT_FILES, "model weights")
        own_processor = local and has_files(folder, ["preprocessor_config.json", "vocab.json", "merges.txt"])
        processor = folder if own_processor else locate(cls.name, LAION_CLIP_H, PROCESSOR_FILES, "processor")
        return Source(
            cls.name, Path(arg.rstrip("/")).name, describe(folder), {"model": folder, "processor": processor}
        )

    def __init__(self, source: Source, device: str | None = None) -> None:
        super().__init__(source, device)
        from transformers import CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(source.files["model"]).eval().to(self.device)
        self.image_processor = clip_image_processor(source.files["processor"])
        self.tokenizer = CLIPTokenizer.from_pretrained(source.files["processor"])

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(
            self.device
        )
        image_embs = pooled(self.model.get_image_features(pixel_values=pixels))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = pooled(self.model.get_text_features(**text))
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        return (self.model.logit_scale.exp() * (text_embs * image_embs).sum(-1)).cpu().tolist()
