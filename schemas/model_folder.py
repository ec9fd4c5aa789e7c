"""`--model` resolved before any work: a local diffusers folder checked for the parts a CLI needs, or a hub id found
in (or fetched into) the Hugging Face cache. A path is never sent to the hub, and a folder that lacks a part, or
holds a truncated weight file, is an InputError naming it instead of a library's traceback half-way through a run.

  resolve_model(model, parts) -> ModelFolder(path, family)   parts: the subfolders needed, or a function of the
                                                              family (e.g. `denoiser_parts`)
  check_weight_files(folder, flag)                            every *.safetensors under `folder` has a whole header
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import InputError
from schemas.families import FAMILIES, Family, folder_family

# the file that makes a subfolder a loadable part (tokenizers vary: any file will do)
# text encoders (text_encoder, text_encoder_2, ...) of each family's pipeline
TEXT_ENCODERS = {"sd15": 1, "sdxl": 2, "sd3": 3, "flux": 2}
PART_CONFIG = {"scheduler": "scheduler_config.json"}
NETWORK_CONFIG = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
Parts = Sequence[str] | Callable[[Family], Sequence[str]]


@dataclass(frozen=True)
class ModelFolder:
    # the local folder the parts load from (for a hub id, its snapshot in the Hugging Face cache)
    path: Path
    family: Family


def denoiser_parts(family: Family) -> tuple[str, ...]:
    """What training and evaluation load: the noise schedule and the denoiser."""
    return ("scheduler", family.denoiser)


def encode_parts(family: Family) -> tuple[str, ...]:
    """What the encode loads: the VAE, and the text encoders with their tokenizers."""
    suffixes = ("", "_2", "_3")[: TEXT_ENCODERS[family.name]]
    return ("vae", *(f"{kind}{s}" for s in suffixes for kind in ("text_encoder", "tokenizer")))


def pipeline_parts(family: Family) -> tuple[str, ...]:
    """What sampling loads: the whole text-to-image pipeline."""
    return (*denoiser_parts(family), *encode_parts(family))


def looks_like_path(model: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (absolute, ./x, a/b/c, ~) can only be a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        return True
    try:
        validate_repo_id(model)
    except HFValidationError:
        return True
    return False


def safetensors_problem(path: Path) -> str | None:
    """Why safetensors cannot open `path` (a truncated file, a torn header), or None. safe_open reads the header
    only and checks that it covers the file exactly, so this costs no read of the weights."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            return None
    except (SafetensorError, OSError) as e:
        return str(e)


def check_weight_files(folder: Path, flag: str) -> None:
    for path in sorted(Path(folder).rglob("*.safetensors")):
        if problem := safetensors_problem(path):
            raise InputError(f"{flag}: {path} is damaged or truncated ({problem}); restore or re-download it")


def _check_part(folder: Path, part: str, model: str, flag: str) -> None:
    sub = folder / part
    if not sub.is_dir() or not any(sub.iterdir()):
        raise InputError(
            f"{flag} {model}: no {part}/ in {folder}; pass the pipeline folder (model_index.json, "
            f"{part}/, ...), not one of its parts"
        )
    config = PART_CONFIG.get(part, NETWORK_CONFIG)
    if part.startswith("tokenizer"):
        return
    if not (sub / config).is_file():
        raise InputError(f"{flag} {model}: {sub} has no {config}")
    if config == NETWORK_CONFIG and not any(p.name.endswith(WEIGHT_SUFFIXES) for p in sub.iterdir()):
        raise InputError(f"{flag} {model}: {sub} holds no weight file (*.safetensors)")
    check_weight_files(sub, flag)


def _hub_snapshot(model: str, flag: str, parts: Parts) -> Path:
    """The cached snapshot of hub id `model` holding `parts` (fetched unless offline); InputError saying which of
    offline, unreachable or unknown it was."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        index = Path(hf_hub_download(model, "model_index.json"))
        needed = parts if not callable(parts) else parts(FAMILIES[folder_family(index.parent)])
        patterns = ["model_index.json", *(f"{part}/*" for part in needed)]
        return Path(snapshot_download(model, allow_patterns=patterns, ignore_patterns=["*.fp16.*"]))
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        raise InputError(
            f"{flag} {model}: no local folder of that name, and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) while offline: {why} ({type(e).__name__}). Download it once with "
            "network access, or pass a local snapshot folder"
        ) from None
    except Exception as e:
        # the hub client raises HTTP, connection and repository errors alike
        raise InputError(
            f"{flag} {model}: fetching it from the hub failed ({type(e).__name__}: {e})"
        ) from None


def resolve_model(model: str, parts: Parts, flag: str = "--model") -> ModelFolder:
    """`model` as a folder whose `parts` (subfolders; or a function of the family giving them) are present, with
    configs and whole weight files. Raises InputError naming the flag and what is missing."""
    path = Path(model).expanduser()
    if path.is_dir():
        folder = path
    elif path.exists():
        raise InputError(f"{flag} {model}: is a file, not a model folder")
    elif looks_like_path(model):
        raise InputError(f"{flag} {model}: the local folder does not exist")
    else:
        folder = _hub_snapshot(model, flag, parts)
    family = FAMILIES[folder_family(folder)]
    for part in parts(family) if callable(parts) else parts:
        _check_part(folder, part, model, flag)
    return ModelFolder(folder.resolve(), family)
