"""One pair sample and one text sample, as they sit inside the WebDataset tars.

Pair sample (key = `pair_key(ranking_id)`):
  `<key>.json`         PairMeta: ranking_id, caption_key, label_0, and per image (w = preferred, l = other)
                       its uid, original size [h, w], crop offsets [top, left] for the plain and the flipped view.
  `<key>.safetensors`  fp16 tensors [C, h, w]: `w_mean`, `l_mean` (+ `w_logvar`, `l_logvar` in moments mode),
                       and the same names with `_flip` appended when flipped variants are cached.
                       Moments are the VAE posterior, *unscaled*: latent = (mean + exp(logvar/2)·ε − shift)·scale.
Text sample (key = `caption_key(caption)`):
  `<key>.safetensors`  `prompt_embeds` [77, D] (+ `pooled_prompt_embeds` [P] for SDXL).
Nothing is pickled: tensors are safetensors, metadata is JSON.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

PAIR_META_EXT = "json"
TENSORS_EXT = "safetensors"
LATENT_MODES = ("moments", "mean")
SIDES = ("w", "l")
EMPTY_CAPTION = ""


def caption_key(caption: str) -> str:
    """Stable id of a caption's text embedding: the same string always maps to the same key."""
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


def pair_key(ranking_id: int) -> str:
    """WebDataset splits keys at the first dot, so keys are plain digits (a leading 'n' for negatives)."""
    ranking_id = int(ranking_id)
    return f"{ranking_id:020d}" if ranking_id >= 0 else f"n{-ranking_id:020d}"


def latent_tensor_names(latent_mode: str, flip: bool) -> list[str]:
    """The tensors a pair sample must hold for a given encode configuration."""
    if latent_mode not in LATENT_MODES:
        raise ValueError(f"latent_mode must be one of {LATENT_MODES}, got {latent_mode!r}")
    parts = ["mean", "logvar"] if latent_mode == "moments" else ["mean"]
    views = ["", "_flip"] if flip else [""]
    return [f"{side}_{part}{view}" for view in views for side in SIDES for part in parts]


@dataclass(frozen=True)
class ImageMeta:
    uid: str
    original_size: tuple[int, int]  # (height, width) before resize
    crop_top_left: tuple[int, int]  # (top, left) of the center crop in the resized image
    crop_top_left_flip: tuple[int, int]  # the same crop seen in the horizontally flipped image


@dataclass(frozen=True)
class PairMeta:
    ranking_id: int
    caption_key: str
    label_0: float
    w: ImageMeta
    l: ImageMeta  # noqa: E741 - "l" is the paper's name for the less preferred image

    def to_json_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, where: str = "<pair>") -> PairMeta:
        try:
            d = json.loads(data)
            return cls(
                ranking_id=int(d["ranking_id"]),
                caption_key=str(d["caption_key"]),
                label_0=float(d["label_0"]),
                w=_image_meta(d["w"]),
                l=_image_meta(d["l"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed pair metadata ({type(e).__name__}: {e})") from e


def _image_meta(d: dict[str, Any]) -> ImageMeta:
    return ImageMeta(
        uid=str(d["uid"]),
        original_size=(int(d["original_size"][0]), int(d["original_size"][1])),
        crop_top_left=(int(d["crop_top_left"][0]), int(d["crop_top_left"][1])),
        crop_top_left_flip=(int(d["crop_top_left_flip"][0]), int(d["crop_top_left_flip"][1])),
    )


def encode_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()})


def decode_tensors(data: bytes, required: list[str], where: str) -> dict[str, torch.Tensor]:
    """Load a safetensors member and check it holds every required tensor; errors name shard and key."""
    try:
        tensors = load_safetensors(bytes(data))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{where}: unreadable safetensors member ({e})") from e
    missing = [name for name in required if name not in tensors]
    if missing:
        raise ValueError(f"{where}: safetensors member lacks tensors {missing} (has {sorted(tensors)})")
    return tensors


def text_tensor_names(has_pooled: bool) -> list[str]:
    return ["prompt_embeds", "pooled_prompt_embeds"] if has_pooled else ["prompt_embeds"]
