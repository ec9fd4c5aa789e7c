"""What every scorer shares: where its weights come from, and the batch call Ray (or a plain loop) runs it through.

A scorer is resolved first (`Scorer.resolve`: find or download the files, name the version; cheap), and loaded only
when there are images to score (the constructor: the weights onto the device). `__call__` takes a batch dict with
the columns "path" (PNG files) and "prompt", reads the images itself and adds "score", so a Ray Data
`map_batches(ScorerClass, fn_constructor_args=(source,), num_gpus=1)` can run it as one actor per GPU, the way
stages/encode_latents.py's LatentEncoder runs the VAE; evaluation/score.py calls it in a loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from schemas.errors import InputError

LAION_CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]
PROCESSOR_FILES = ["preprocessor_config.json", *TOKENIZER_FILES]


@dataclass(frozen=True)
class Source:
    """A resolved scorer: its name and version (scores of different versions never compare), a description of
    where the weights came from, and the local files it loads."""

    name: str
    version: str
    weights: str
    files: dict[str, Path] = field(default_factory=dict)


def describe(path: Path) -> str:
    """`owner/name@commit` for a Hugging Face cache snapshot, else the absolute path."""
    parts = path.resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return f"{part.removeprefix('models--').replace('--', '/')}@{parts[i + 2][:12]}"
    return str(path.resolve())


def locate(scorer: str, source: str, patterns: list[str], what: str) -> Path:
    """A local file or folder as it is; a hub id `owner/name` → its snapshot folder in the Hugging Face cache with
    the files matching `patterns`, downloaded when online and missing (the encode's --model does the same)."""
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    if source.startswith(("/", ".", "~")) or source.count("/") != 1:
        raise InputError(
            f"--scorer {scorer}: {what} {source}: no such file or folder (nor a hub id like owner/name)"
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        raise InputError(
            f"--scorer {scorer}: {what} {source} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"cannot be downloaded: {why} ({type(e).__name__}). Download it once with network access "
            f"(hf download {source} {' '.join(patterns)}), or pass a local copy as --scorer {scorer}=PATH"
        ) from e
    except Exception as e:  # the hub client raises HTTP, connection and repository errors alike
        raise InputError(
            f"--scorer {scorer}: fetching {what} {source} from the hub failed ({type(e).__name__}: {e})"
        ) from e


def require(scorer: str, folder: Path, names: list[str], what: str) -> Path:
    """The first of `names` present in `folder`; none present is an error naming them."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"--scorer {scorer}: {folder} holds no {what} ({' or '.join(names)})")


def has_files(folder: Path, names: list[str]) -> bool:
    return folder.is_dir() and all((folder / n).is_file() for n in names)


def load_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


class Scorer:
    """A reward model over a batch of images and their prompts (higher = better)."""

    name: ClassVar[str]
    default: ClassVar[str | None] = None  # the argument of a bare `--scorer NAME`

    def __init__(self, source: Source, device: str | None = None) -> None:
        self.source = source
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def resolve(cls, arg: str | None) -> Source:
        """`--scorer NAME=ARG` → the files to load and the version; downloads what the cache lacks."""
        raise NotImplementedError

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [load_rgb(p) for p in batch["path"]]
        scores = self.score(images, [str(p) for p in batch["prompt"]])
        return {**batch, "score": np.asarray(scores, dtype=np.float64)}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or from a pickle through torch.load(weights_only=True) only (tensors and plain
    containers, never code); a checkpoint dict's "state_dict" is unwrapped, as HPSv2 saves it."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, a pickle that holds code, not a checkpoint at all
        raise InputError(f"{path}: not a loadable weights file ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    return state


def pooled(output: torch.Tensor | object) -> torch.Tensor:
    """CLIPModel.get_*_features: a tensor on transformers 4, an output object holding it on transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_image_processor(folder: Path):
    """CLIP's image processor on its PIL backend: the one transformers 4 ran by default (so the published numbers'
    pixels), and the one transformers 5 falls back to without torchvision, here always, whatever is installed."""
    try:
        from transformers import CLIPImageProcessorPil as processor
    except ImportError:  # transformers 4: the PIL processor has the plain name
        from transformers import CLIPImageProcessor as processor
    return processor.from_pretrained(folder)
