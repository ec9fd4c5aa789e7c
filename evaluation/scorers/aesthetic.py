"""LAION aesthetic predictor: an MLP on the normalised CLIP ViT-L/14 image embedding, as Diffusion-DPO's
utils/aes_utils.py runs it (transformers' openai/clip-vit-large-patch14 and its processor; the prompt is unused)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from evaluation.scorers import base
from schemas.errors import InputError

MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
MLP_SOURCE = "github.com/christophschuhmann/improved-aesthetic-predictor"
CLIP_L = "openai/clip-vit-large-patch14"


# (output width, dropout after it) of each linear layer, in order
LAYERS = ((1024, 0.2), (128, 0.2), (64, 0.1), (16, None), (1, None))


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor MLP: linear layers with dropout between some and no activation, in an
    nn.Sequential named `layers` (its state dict keys are layers.0, .2, .4, .6, .7)."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        for width, dropout in LAYERS:
            modules.append(nn.Linear(input_size, width))
            if dropout:
                modules.append(nn.Dropout(dropout))
            input_size = width
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Aesthetic(base.Scorer):
    """`aesthetic=PATH`: the MLP file (or a folder or hub repo holding it); CLIP ViT-L/14 comes from a transformers
    CLIP folder beside it when there, else from openai/clip-vit-large-patch14."""

    name = "aesthetic"

    @classmethod
    def resolve(cls, arg: str | None) -> base.Source:
        if not arg:
            raise InputError(
                f"--scorer aesthetic needs =PATH: the LAION aesthetic MLP {MLP_FILE} (from {MLP_SOURCE}), "
                "as a file or a folder or hub repo holding it"
            )
        path = base.locate(cls.name, arg, [MLP_FILE], "aesthetic MLP")
        mlp = path if path.is_file() else base.require(cls.name, path, [MLP_FILE], "aesthetic MLP")
        clip = mlp.parent
        if not base.has_files(clip, ["config.json", "preprocessor_config.json"]):
            clip = base.locate(
                cls.name, CLIP_L, ["config.json", "preprocessor_config.json", "model.safetensors"], "CLIP"
            )
        return base.Source(cls.name, Path(mlp).stem, base.describe(mlp), {"mlp": mlp, "clip": clip})

    def __init__(self, source: base.Source, device: str | None = None) -> None:
        super().__init__(source, device)
        from transformers import CLIPModel

        state = base.read_state_dict(source.files["mlp"])
        try:
            mlp = AestheticMLP(state["layers.0.weight"].shape[1])
            mlp.load_state_dict(state)
        except (KeyError, RuntimeError) as e:
            raise InputError(f"{source.files['mlp']}: not the aesthetic MLP's state dict ({e})") from e
        self.mlp = mlp.eval().to(self.device)
        self.clip = CLIPModel.from_pretrained(source.files["clip"]).eval().to(self.device)
        self.image_processor = base.clip_image_processor(source.files["clip"])

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        image_embs = base.pooled(self.clip.get_image_features(pixel_values=pixels))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        return self.mlp(image_embs).flatten().cpu().tolist()
