"""`OUT/manifest.json` and `OUT/report.json`: the only files a reader of an encode output trusts.

A tar that is not listed in the manifest does not exist as far as the trainer is concerned, so an encode that was
killed half-way can leave partial files behind without anyone reading them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from schemas.errors import InputError
from schemas.families import MODEL_FAMILIES
from schemas.storage import exists, join, read_json, write_json

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardEntry:
    path: str  # relative to the encode output directory
    num_samples: int


@dataclass(frozen=True)
class Manifest:
    num_samples: int
    shards: list[ShardEntry]
    num_text_samples: int
    text_shards: list[ShardEntry]
    empty_caption_key: str
    model: str
    model_family: str  # "sd15" or "sdxl"
    resolution: int
    vae_scaling_factor: float
    vae_shift_factor: float | None
    latent_dtype: str  # "float16"
    latent_mode: str  # "moments" or "mean"
    latent_shape: list[int]  # [C, h, w]
    flip_variants: bool  # `_flip` tensors cached
    # [77, D]; SD3 [77 + max_sequence_length, D], FLUX [max_sequence_length, D]
    text_embed_shape: list[int]
    # SDXL, SD3, FLUX
    pooled_embed_dim: int | None
    tie_policy: str
    encode_config: dict[str, Any]
    versions: dict[str, str]
    format_version: int = FORMAT_VERSION
    created_at: str = ""
    # the per-member checksum algorithm (schemas.sample.CHECKSUM) the encode wrote; None: an encode from before
    # checksums, read unverified
    checksum: str | None = None
    # SD3 / FLUX: T5 tokens per caption embedding (None: CLIP's 77 only)
    max_sequence_length: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> None:
        """The output's single commit point: written last, whole (a rename locally, one PUT on object storage)."""
        write_json(join(out_dir, MANIFEST_NAME), asdict(self))

    @classmethod
    def load(cls, out_dir: str | Path) -> Manifest:
        """Load and check a manifest (a path or any fsspec URL); every error (an InputError) names the file and the
        offending key."""
        path = join(out_dir, MANIFEST_NAME)
        if not exists(path):
            raise FileNotFoundError(f"{path}: no manifest; is {out_dir} a finished encode output?")
        d = read_json(path)
        if not isinstance(d, dict):
            raise InputError(f"{path}: expected a JSON object")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise InputError(f"{path}: format_version {version!r} is not the supported {FORMAT_VERSION}")
        try:
            d["shards"] = [ShardEntry(str(s["path"]), int(s["num_samples"])) for s in d["shards"]]
            d["text_shards"] = [ShardEntry(str(s["path"]), int(s["num_samples"])) for s in d["text_shards"]]
            manifest = cls(**d)
        except (KeyError, TypeError) as e:
            raise InputError(f"{path}: missing or malformed key ({e})") from e
        manifest.check(path)
        return manifest

    def check(self, where: str | Path) -> None:
        if self.model_family not in MODEL_FAMILIES:
            raise InputError(f"{where}: model_family {self.model_family!r} not in {MODEL_FAMILIES}")
        if self.num_samples != sum(s.num_samples for s in self.shards):
            raise InputError(f"{where}: num_samples does not equal the sum over shards")
        if self.num_text_samples != sum(s.num_samples for s in self.text_shards):
            raise InputError(f"{where}: num_text_samples does not equal the sum over text_shards")
        for s in [*self.shards, *self.text_shards]:
            if Path(s.path).is_absolute() or ".." in Path(s.path).parts:
                raise InputError(f"{where}: shard path {s.path!r} must be relative to the output directory")


@dataclass(frozen=True)
class Report:
    rows_read: int
    rows_written: int
    dropped: dict[str, int]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> None:
        write_json(join(out_dir, REPORT_NAME), asdict(self))

    @classmethod
    def load(cls, out_dir: str | Path) -> Report:
        d = read_json(join(out_dir, REPORT_NAME))
        return cls(**d)


# Why a row was dropped; the keys of `Report.dropped`.
DROP_TIE = "tie"  # label_0 == 0.5 under the default tie policy
DROP_BAD_LABEL = "bad_label"  # label_0 null or not one of 0, 0.5, 1
DROP_NULL_CAPTION = "null_caption"
DROP_NULL_IMAGE = "null_image"  # jpg_0 or jpg_1 is null
DROP_EMPTY_IMAGE = "empty_image"  # zero bytes
DROP_UNDECODABLE_IMAGE = "undecodable_image"  # truncated or not an image
DROP_REASONS = (
    DROP_TIE,
    DROP_BAD_LABEL,
    DROP_NULL_CAPTION,
    DROP_NULL_IMAGE,
    DROP_EMPTY_IMAGE,
    DROP_UNDECODABLE_IMAGE,
)
