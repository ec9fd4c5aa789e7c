"""HPSv2 (v2.0, v2.1) and CLIP-H (DiffusionDPO's `clip`): open_clip ViT-H-14 checkpoints, scored as HPSv2's
`score()` scores: the cosine of the normalised image and text features.

The preprocessing is HPSv2's validation transform (its create_model_and_transforms with light_augmentation=True):
RGB → [0, 1] tensor → bicubic (antialiased) resize of the longer side to 224 → centred on black to 224x224 →
CLIP mean/std. DiffusionDPO's utils/clip_utils.py builds the same model through HPSv2's open_clip with LAION's
pretrained weights in place of an HPS checkpoint, so `clip` differs from `hps` only in the weights. Both load as
transformers CLIPModels (open_clip_weights.py); the tokenizer is LAION's CLIP-H one, which tokenizes as open_clip's
(open_clip also runs ftfy's mojibake repair first; this does not).
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation.scorers.base import (
    LAION_CLIP_H,
    TOKENIZER_FILES,
    Scorer,
    Source,
    describe,
    has_files,
    locate,
    pooled,
    read_state_dict,
    require,
)
from evaluation.scorers.open_clip_weights import load_clip_model
from schemas.errors import InputError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN / STD
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}  # HPSv2's hps_version_map
CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


def hps_pixels(images: list[Image.Image], size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """HPSv2's validation transform → float [N, 3, size, size]. HPSv2 leaves an image whose longer side is already
    `size` unpadded (and then fails on it unless square); it is padded here like every other."""
    out = []
    for img in images:
        x = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float().div(255)
        h, w = x.shape[1:]
        scale = size / max(h, w)
        if scale != 1.0:
            new_h, new_w = (round(d * scale) for d in (h, w))
            x = F.interpolate(
                x[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
            )[0]
        pad_h, pad_w = size - x.shape[1], size - x.shape[2]
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        out.append(x)
    pixels = torch.stack(out)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def clean_prompt(text: str) -> str:
    """open_clip's tokenizer clean-up (basic_clean + whitespace_clean) before the byte-level BPE, less ftfy."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def architecture_files(scorer: str, folder: Path) -> dict[str, Path]:
    """open_clip_config.json and the tokenizer: beside the weights when there, else LAION's CLIP-H repo's."""
    tokenizer = ["vocab.json", "merges.txt"]
    if not (
        has_files(folder, [CONFIG_FILE, *tokenizer]) or has_files(folder, [CONFIG_FILE, "tokenizer.json"])
    ):
        folder = locate(scorer, LAION_CLIP_H, [CONFIG_FILE, *TOKENIZER_FILES], "model config and tokenizer")
    return {"config": require(scorer, folder, [CONFIG_FILE], "open_clip model config"), "tokenizer": folder}


class OpenClipCosine(Scorer):
    """Cosine of an open_clip checkpoint's normalised image and text features, HPSv2-preprocessed."""

    def __init__(self, source: Source, device: str | None = None) -> None:
        super().__init__(source, device)
        from transformers import CLIPTokenizer

        config_path = source.files["config"]
        try:
            config = json.loads(config_path.read_text())
            model_cfg = config["model_cfg"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{config_path}: not an open_clip config with a model_cfg ({e})") from e
        preprocess = config.get("preprocess_cfg", {})
        self.mean, self.std = (
            tuple(preprocess.get("mean", OPENAI_MEAN)),
            tuple(preprocess.get("std", OPENAI_STD)),
        )
        self.tokenizer = CLIPTokenizer.from_pretrained(source.files["tokenizer"])
        weights = source.files["weights"]
        model = load_clip_model(
            read_state_dict(weights), model_cfg, self.tokenizer.eos_token_id, str(weights)
        )
        self.model = model.to(self.device)
        self.image_size = model.config.vision_config.image_size
        self.context_length = model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        pixels = hps_pixels(images, self.image_size, self.mean, self.std).to(self.device)
        ids = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        ).input_ids.to(self.device)
        image_features = F.normalize(pooled(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        text_features = F.normalize(pooled(self.model.get_text_features(input_ids=ids)), dim=-1)
        return (image_features * text_features).sum(-1).cpu().tolist()


class HPS(OpenClipCosine):
    """`hps` (v2.0, as Diffusion-DPO and Diffusion-SDPO report), `hps=v2.1`, or `hps=PATH` (a checkpoint named as
    HPSv2 names them, or a folder or hub repo holding one); the version is recorded with every score."""

    name = "hps"
    default = "v2.0"

    @classmethod
    def resolve(cls, arg: str | None) -> Source:
        arg = arg or cls.default
        if arg in HPS_FILES:
            folder = locate(cls.name, HPS_REPO, [HPS_FILES[arg]], f"HPS {arg} checkpoint")
            checkpoint = require(cls.name, folder, [HPS_FILES[arg]], f"HPS {arg} checkpoint")
        else:
            path = locate(cls.name, arg, list(HPS_FILES.values()), "HPS checkpoint")
            present = (
                [path / n for n in HPS_FILES.values() if (path / n).is_file()] if path.is_dir() else [path]
            )
            if len(present) != 1:
                raise InputError(
                    f"--scorer hps={arg}: {path} holds {len(present)} of {list(HPS_FILES.values())}; "
                    "pass the checkpoint file itself (or hps=v2.0 | hps=v2.1 for xswu/HPSv2's)"
                )
            checkpoint = present[0]
        versions = {name: version for version, name in HPS_FILES.items()}
        if checkpoint.name not in versions:
            raise InputError(
                f"--scorer hps={arg}: cannot tell the HPS version of {checkpoint.name}; keep the name HPSv2 gives it "
                f"({' or '.join(versions)}), since v2.0 and v2.1 scores do not compare"
            )
        files = {"weights": checkpoint, **architecture_files(cls.name, checkpoint.parent)}
        return Source(cls.name, versions[checkpoint.name], describe(checkpoint), files)


class ClipH(OpenClipCosine):
    """`clip` (LAION's CLIP-ViT-H-14-laion2B-s32B-b79K, as Diffusion-DPO's utils), or `clip=PATH`: a folder or hub
    repo in LAION's layout (open_clip_config.json, open_clip_model.safetensors or open_clip_pytorch_model.bin,
    tokenizer files)."""

    name = "clip"
    default = LAION_CLIP_H

    @classmethod
    def resolve(cls, arg: str | None) -> Source:
        arg = arg or cls.default
        patterns = [CONFIG_FILE, *TOKENIZER_FILES]
        folder = locate(cls.name, arg, [*patterns, OPEN_CLIP_WEIGHTS[0]], "model")
        if not folder.is_dir():
            raise InputError(f"--scorer clip={arg}: {folder} is a file; pass the folder holding it")
        if not Path(arg).exists() and not any((folder / n).is_file() for n in OPEN_CLIP_WEIGHTS):
            folder = locate(cls.name, arg, [*patterns, OPEN_CLIP_WEIGHTS[1]], "model")  # a repo of .bin only
        weights = require(cls.name, folder, OPEN_CLIP_WEIGHTS, "open_clip weights")
        files = {
            "weights": weights,
            "config": require(cls.name, folder, [CONFIG_FILE], "open_clip model config"),
            "tokenizer": folder,
        }
        return Source(cls.name, Path(arg.rstrip("/")).name, describe(folder), files)
