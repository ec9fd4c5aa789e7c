"""One pair sample and one text sample, as they sit inside the WebDataset tars.

Pair sample (key = `pair_key(ranking_id)`):
  `<key>.json`         PairMeta: ranking_id, caption_key, label_0, and per image (w = preferred, l = other)
                       its uid, original size [h, w], crop offsets [top, left] for the plain and the flipped view.
  `<key>.safetensors`  fp16 tensors [C, h, w]: `w_mean`, `l_mean` (+ `w_logvar`, `l_logvar` in moments mode),
                       and the same names with `_flip` appended when flipped variants are cached.
                       Moments are the VAE posterior, *unscaled*: latent = (mean + exp(logvar/2)·ε − shift)·scale.
Text sample (key = `caption_key(caption)`):
  `<key>.safetensors`  `prompt_embeds` [77, D] (+ `pooled_prompt_embeds` [P] for SDXL).
Nothing is pickled: tensors are safetensors, metadata is JSON. Member names follow WebDataset: the key is the path
up to the first dot of the file name, the extension the rest, and a sample's members are consecutive in the tar.

Integrity: every safetensors member carries, in its header's `__metadata__`, the CRC-32 of its own tensor data
(`crc32`) and, for a pair, of the pair's JSON member (`crc32_json`). A reader verifies both, so a flipped byte
anywhere in a sample is an error naming the shard and key instead of silently different numbers. CRC-32 (zlib, as
zip/gzip/PNG use) is enough to catch storage and transfer damage and costs ~0.1 ms per SD1.5 pair.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import zlib
from collections.abc import Collection, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from schemas import storage
from schemas.errors import InputError
from schemas.families import MODEL_FAMILIES, family_of_index, folder_family

PAIR_META_EXT = "json"
TENSORS_EXT = "safetensors"
LATENT_MODES = ("moments", "mean")
SIDES = ("w", "l")
EMPTY_CAPTION = ""
# compute dtypes by the names the CLIs take (accelerate's mixed_precision "no" means fp32)
TORCH_DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECKSUM = "crc32"  # the algorithm named in the manifest; members written by this version carry one


class CorruptSampleError(InputError):
    """A tar that cannot be read, or a sample whose bytes do not match its stored checksum or cannot be decoded:
    the file is damaged."""


def caption_key(caption: str) -> str:
    """Stable id of a caption's text embedding: the same string always maps to the same key."""
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


def pair_key(ranking_id: int) -> str:
    """WebDataset splits keys at the first dot, so keys are plain digits (a leading 'n' for negatives)."""
    ranking_id = int(ranking_id)
    return f"{ranking_id:020d}" if ranking_id >= 0 else f"n{-ranking_id:020d}"


def tensor_name(side: str, part: str, flipped: bool = False) -> str:
    """`w_mean`, `l_logvar_flip`, …: the name of one latent tensor of a pair sample."""
    return f"{side}_{part}{'_flip' if flipped else ''}"


def latent_tensor_names(latent_mode: str, flip: bool) -> list[str]:
    """The tensors a pair sample must hold for a given encode configuration."""
    if latent_mode not in LATENT_MODES:
        raise ValueError(f"latent_mode must be one of {LATENT_MODES}, got {latent_mode!r}")
    parts = ["mean", "logvar"] if latent_mode == "moments" else ["mean"]
    views = [False, True] if flip else [False]
    return [tensor_name(side, part, flipped) for flipped in views for side in SIDES for part in parts]


def model_family(model: str | Path) -> str:
    """The family (schemas/families.py) of a model folder or hub id: the one family test of the encode (which text
    encoders to run) and the trainer (which denoiser, which data fits it). A hub id is read from its
    model_index.json (the Hugging Face cache, or fetched)."""
    folder = Path(model)
    if folder.is_dir():
        return folder_family(folder)
    from huggingface_hub import hf_hub_download

    index = json.loads(Path(hf_hub_download(str(model), "model_index.json")).read_text())
    family = family_of_index(index)
    if family is None:
        raise InputError(
            f"--model {model}: pipeline {index.get('_class_name')!r} is not one of {MODEL_FAMILIES}"
        )
    return family


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


def _crc(data: bytes | memoryview) -> str:
    return f"{zlib.crc32(data):08x}"


def encode_tensors(tensors: dict[str, torch.Tensor], companion: bytes | None = None) -> bytes:
    """One safetensors member whose header records the CRC-32 of its tensor data (and of `companion`, the pair's
    JSON member). The data section does not depend on the metadata, so it is serialised once to be measured."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    plain = save_safetensors(tensors)
    metadata = {CHECKSUM: _crc(memoryview(plain)[8 + _header_len(plain) :])}
    if companion is not None:
        metadata[f"{CHECKSUM}_json"] = _crc(companion)
    return _sorted_header(save_safetensors(tensors, metadata=metadata))


def _sorted_header(data: bytes) -> bytes:
    """safetensors writes `__metadata__` from a Rust HashMap, whose order changes from process to process; sorting
    the header's keys makes the same tensors give the same bytes (reproducible encodes). Only the order changes, so
    the header keeps its length and padding."""
    n = _header_len(data)
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) > n:
        raise ValueError(f"safetensors header grew from {n} to {len(header)} bytes when sorted")
    return data[:8] + header.ljust(n) + data[8 + n :]


def _header_len(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def decode_tensors(
    data: bytes,
    required: list[str],
    where: str,
    *,
    companion: bytes | None = None,
    require_checksum: bool = False,
) -> dict[str, torch.Tensor]:
    """Load a safetensors member, verify its checksums and check it holds every required tensor; errors name shard
    and key. `companion` is the pair's JSON member, verified against the CRC stored with the tensors.
    `require_checksum`: the manifest says the encode wrote checksums, so a member without one is damaged too."""
    data = bytes(data)
    try:
        n = _header_len(data)
        stored = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CorruptSampleError(f"{where}: unreadable safetensors member ({e})") from e
    checks = [(CHECKSUM, memoryview(data)[8 + n :])]
    if companion is not None:
        checks.append((f"{CHECKSUM}_json", companion))
    for name, payload in checks:
        if name not in stored:
            if require_checksum:
                raise CorruptSampleError(
                    f"{where}: member has no {name} checksum; the manifest says it should"
                )
            continue
        if (actual := _crc(payload)) != stored[name]:
            part = "JSON member" if name.endswith("_json") else "tensor data"
            raise CorruptSampleError(
                f"{where}: {part} fails its checksum ({name} stored {stored[name]}, computed {actual}); "
                "the file is damaged: re-encode it or restore it from a copy"
            )
    missing = [name for name in required if name not in tensors]
    if missing:
        raise ValueError(f"{where}: safetensors member lacks tensors {missing} (has {sorted(tensors)})")
    return tensors


def text_tensor_names(has_pooled: bool) -> list[str]:
    return ["prompt_embeds", "pooled_prompt_embeds"] if has_pooled else ["prompt_embeds"]


@dataclass
class TarSample:
    """One sample of a WebDataset tar: the byte range of every member, and the data of those asked for."""

    key: str
    where: str  # "tar:key", for error messages
    spans: dict[str, tuple[int, int]] = field(
        default_factory=dict
    )  # ext -> (offset, size) of the data in the tar
    data: dict[str, bytes] = field(default_factory=dict)  # ext -> bytes, for the extensions read


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = the path up to the first dot of the file name, extension = the rest."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def read_tar(path: str | Path, read: Collection[str] = ()) -> Iterator[TarSample]:
    """The samples of an uncompressed tar (a path or any fsspec URL) in file order, streamed front to back, with
    the data of the members whose extension is in `read`.

    The one reader of encode outputs (writer checks, trainer stream, text index, tests). Raises CorruptSampleError
    naming the tar for an unreadable or truncated tar, and naming the sample for a member that occurs twice.
    """
    try:
        with storage.open_read(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            sample: TarSample | None = None
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = split_member_name(info.name)
                if sample is None or key != sample.key:
                    if sample is not None:
                        yield sample
                    sample = TarSample(key, f"{path}:{key}")
                if ext in sample.spans:
                    raise CorruptSampleError(f"{sample.where}: member .{ext} occurs twice")
                sample.spans[ext] = (info.offset_data, info.size)
                if ext in read:
                    sample.data[ext] = tar.extractfile(info).read()
            if sample is not None:
                yield sample
    except (tarfile.TarError, OSError) as e:
        raise CorruptSampleError(f"{path}: unreadable tar ({e})") from e


def write_tar(dest: BinaryIO | str | Path, samples: Iterable[dict[str, Any]]) -> None:
    """The one tar writer of encode outputs (the encode's ShardWriter, embedded's test data): each sample a dict of
    `__key__` and extension → bytes, written by webdataset's TarWriter with every member at mtime 0, owner
    data:data, mode 0644, so the same samples always give the same bytes. `dest`: an open binary file, or a local
    path (opened directly: webdataset's own opener refuses local paths under WDS_SECURE=1)."""
    from webdataset import TarWriter  # the trainer reads tars but never writes one: no import there

    if not hasattr(dest, "write"):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as f:
            write_tar(f, samples)
        return
    with TarWriter(dest, encoder=False, mtime=0, user="data", group="data", mode=0o644) as tar:
        for sample in samples:
            tar.write(sample)
