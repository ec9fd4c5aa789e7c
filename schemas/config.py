"""The two configuration objects, and one way to fill them from a file plus command-line flags.

Every field is also a flag (`snake_case` → `--kebab-case`); `--config FILE` (JSON or TOML) supplies defaults and the
command line wins. Booleans take `--flag` / `--no-flag`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class EncodeConfig:
    src: str = ""  # directory, glob, brace pattern, comma-separated list, or fsspec URL (s3://...)
    format: str = "pickapic"  # input layout: pickapic, preference (hub parquet) or webdataset (tars)
    columns: str = (
        ""  # preference/webdataset: ROLE=NAME,... e.g. caption=prompt,chosen=chosen,rejected=rejected
    )
    out: str = ""
    model: str = ""  # hub id, local snapshot, or models/tiny-sd15
    resolution: int = 512
    latent_mode: str = (
        "moments"  # "moments" (mean + logvar, fresh sample per step) or "mean" (half the bytes)
    )
    flip: bool = True  # cache horizontally flipped variants, as the official recipe flips by default
    # "official": DiffusionDPO's decode, resize and crop bit for bit; "fast": DCT-scaled JPEG decode (README)
    preprocess: str = "official"
    # "convert": alpha dropped, as .convert("RGB") does (official); "white": composited onto white
    alpha: str = "convert"
    dtype: str = "auto"  # VAE/text encoder compute dtype: auto (fp16 on GPU unless force_upcast, else fp32), fp32, fp16, bf16
    tie_policy: str = (
        "drop"  # "drop" ties (label_0 == 0.5) or "keep" them (trainer treats them as soft labels)
    )
    shard_size: int = 1000  # pair samples per tar
    text_shard_size: int = 5000  # caption embeddings per text tar
    chunk_files: int = (
        32  # input files (parquet or tar) per chunk: the unit of atomic publish and of skipping on rerun
    )
    decode_batch_size: int = 32
    encode_batch_size: int = 16  # pairs per VAE call (4 images each with flips)
    text_batch_size: int = 64
    num_encoders: int = 0  # encoder actors; 0 = one per GPU, or one per 2 CPUs without GPUs
    ray_address: str | None = None  # None: join RAY_ADDRESS / a running cluster, else start a local one
    seed: int = 0


@dataclass
class TrainConfig:
    data: str = ""  # encode output directory (has manifest.json)
    model: str = ""  # base model: hub id, snapshot, or models/tiny-sd15
    output_dir: str = "runs/dpo"
    val_data: str | None = None
    # objective
    # dpo cdpo ipo hinge dmpo mapo kto dspo sft (preferred images only) diffusion (plain denoising on both images)
    loss: str = "dpo"
    beta: float | None = (
        None  # None: the loss's published β for the model family (README, "Preference losses")
    )
    label_smoothing: float | None = None  # cdpo ε (None: 0.1)
    dmpo_alpha: float | None = None  # dmpo α (None: 0.01)
    mapo_scale: float | None = None  # mapo s (None: 0.5)
    mapo_temperature: float | None = None  # mapo T (None: the scheduler's num_train_timesteps)
    kto_lambda_desirable: float | None = None  # kto λ_D (None: 1)
    kto_lambda_undesirable: float | None = None  # kto λ_U (None: 1)
    kto_reference_point: str = (
        "mismatched"  # kto z0 from "mismatched" image/caption pairs or the "batch" itself
    )
    sdpo_mu: float = 0.0  # > 0: wrap dpo, cdpo, dmpo or dspo in the Diffusion-SDPO safeguard with this μ
    caption_dropout: float = 0.2
    # optimisation
    seed: int = 0
    max_steps: int = 2000
    batch_size: int = 1  # pairs per process per micro-step
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-8
    scale_lr: bool = True  # lr × batch_size × accumulation × processes, as the official launchers do
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 500
    optimizer: str = "adamw"  # "adamw" or "adafactor"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    lora_rank: int = 0  # 0 = full fine-tune; > 0 = LoRA with the reference = adapters disabled
    lora_alpha: float | None = None  # defaults to lora_rank
    # SDXL micro-conditioning: "constant" = (R, R, 0, 0, R, R), DiffusionDPO's official SDXL recipe and what SDXL
    # pipelines pass at inference by default; "image" = each image's stored original size and crop (diffusers'
    # SDXL script, MaPO). Default: the official recipe, so results are comparable with the paper's.
    sdxl_time_ids: str = "constant"
    # data stream
    num_workers: int = 2
    shards_in_flight: int = 4  # shards mixed together by each worker
    data_only: bool = False  # iterate the stream for max_steps batches, no model work
    fixed_batch: bool = False  # benchmark: train on the first batch, kept on the device, at every step
    # checkpoints, logging, evaluation
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 3
    resume: str | None = None  # "latest" or a checkpoint directory
    overwrite_output_dir: bool = False  # replace the run output_dir holds (its checkpoints, final/, logs)
    max_skipped_fraction: float = (
        0.1  # stop (exit 3) when more steps than this had a non-finite loss or gradient
    )
    log_every: int = 10
    eval_every: int = 0  # with val_data: evaluate every N steps (0 = only at the end)
    eval_max_pairs: int = 512
    eval_draws: int = 4  # (noise, timestep) draws averaged per held-out pair
    report_to: str = "tensorboard"  # or "none"
    extra: dict[str, Any] = field(default_factory=dict)


def _base_type(tp: Any) -> Any:
    """`int | None` → int, so argparse knows how to parse the value."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _check_type(parser: argparse.ArgumentParser, path: str, key: str, value: Any, hint: Any) -> None:
    """A file value must already have its field's type (TOML `max_steps = "20"` is a string, not a count): an error
    naming the key instead of a comparison failing deep inside the run. An int is accepted where a float is due."""
    if value is None and hint is not _base_type(hint):
        return
    tp = _base_type(hint)
    if tp in (int, float, bool, str):
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        ok = ok or (tp is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            parser.error(
                f"config {path}: {key} = {value!r} is a {type(value).__name__}, expected {tp.__name__}"
            )


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config", help="JSON or TOML file with any of the flags below; the command line wins"
    )
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        default_text = f"(default: {f.default})" if f.default is not dataclasses.MISSING else ""
        if tp is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=default_text
            )
        else:
            parser.add_argument(flag, dest=f.name, type=tp, default=None, help=default_text)
    return parser


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: config {path}: {e}") from e


def parse_config(cls: type[T], argv: list[str] | None, description: str) -> T:
    """Defaults < config file < command line; an unknown key or a value of the wrong type in the file is an error
    naming the key (exit 2, as argparse does for a bad flag)."""
    parser = build_parser(cls, description)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    known = {f.name for f in fields(cls)}
    if args.config:
        file_values = load_config_file(args.config)
        unknown = sorted(set(file_values) - known)
        if unknown:
            parser.error(f"config {args.config}: unknown keys {unknown}")
        hints = typing.get_type_hints(cls)
        for key, value in file_values.items():
            _check_type(parser, args.config, key, value, hints[key.replace("-", "_")])
        values.update({k.replace("-", "_"): v for k, v in file_values.items()})
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return cls(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
