"""Pickle-free, atomic training checkpoints and the final diffusers-layout export.

`OUT/checkpoints/step_{n:08d}/` holds:
  model.safetensors      the trainable parameters by name (the whole UNet, or only the LoRA weights)
  optimizer.safetensors  optimizer tensors keyed `state.{param_idx}.{name}`
  optimizer.json         the optimizer's non-tensor state and param_groups
  state.json             the TrainState counters, lr schedule, grad scaler, topology, seed, config, and the size
                         and CRC-32 of each file above (`files`), so a damaged checkpoint is found before a resume
All randomness in training is counter-based (seeded by seed, rank and step), so no RNG state is needed.

A checkpoint is written as `step_n.tmp` by the main process, fsynced, and renamed once complete, so a crash while
saving leaves the previous checkpoint intact, and `latest` never picks a `.tmp`.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import os
import re
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import diffusers
import torch
from accelerate import Accelerator
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from schemas.atomic import publish_dir
from schemas.config import TrainConfig
from schemas.errors import InputError
from schemas.families import Family
from schemas.model_folder import safetensors_problem
from schemas.options import Resume, keys_with
from schemas.storage import read_json, write_json
from trainer.model import has_lora

CHECKPOINTS = "checkpoints"
FINAL = "final"
# OUT/final/run.json, beside final/unet: the run id, step and data summary of the run that exported it
EXPORT_RECORD = "run.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json")
# what the Rust safetensors writer reports a failed write as: "... I/O error: No space left on device (os error 28)"
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# A resume must see the same data topology, or its data position would point at different batches: the number of
# processes and the TrainConfig fields whose resume rule is Resume.TOPOLOGY.
_TOPOLOGY_FIELDS = keys_with(TrainConfig, Resume.TOPOLOGY)
TOPOLOGY_KEYS = ("world_size", *_TOPOLOGY_FIELDS)


@dataclasses.dataclass
class TrainState:
    """The run's counters: what a checkpoint saves and a resume restores (all randomness derives from them)."""

    # optimizer steps taken, skipped ones included
    global_step: int = 0
    # micro-batches this process consumed: its data position and its noise counter
    micro_step: int = 0
    # steps whose update was skipped for a non-finite loss or gradient
    skipped_steps: int = 0

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> Self:
        return cls(**{f.name: int(saved[f.name]) for f in dataclasses.fields(cls)})


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:08d}"


ANY_RUN = "*"


def list_checkpoints(output_dir: str | Path, run_id: str | None = ANY_RUN) -> list[Path]:
    """Complete checkpoints, oldest first; `*.tmp` folders left by a crashed save are not checkpoints. With a
    `run_id`, only that run's."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").is_file())
    if run_id == ANY_RUN:
        return found
    return [p for p in found if read_json(p / "state.json").get("run_id") == run_id]


def trainable_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in unet.named_parameters() if p.requires_grad}


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def file_record(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        name: {"bytes": (folder / name).stat().st_size, "crc32": file_crc32(folder / name)}
        for name in CHECKPOINT_FILES
    }


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (a missing, truncated or changed file), or None. Each
    file is compared with the size and CRC-32 its state.json recorded; a checkpoint without that record (an older
    version) has its safetensors headers checked instead."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        return f"state.json unreadable ({e})"
    record = state.get("files") or {}
    for name in CHECKPOINT_FILES:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if name in record:
            size = file.stat().st_size
            if size != record[name]["bytes"]:
                return f"{name} has {size} bytes, {record[name]['bytes']} were written"
            if file_crc32(file) != record[name]["crc32"]:
                return f"{name} fails its CRC-32 check (changed on disk since it was written)"
        elif name.endswith(".safetensors") and (problem := safetensors_problem(file)):
            return f"{name}: {problem}"
    return None


@contextmanager
def disk_errors(path: Path, needed_bytes: int) -> Iterator[None]:
    """A failed write as one OSError naming `path`, with what a write of `needed_bytes` needed and what is free:
    the safetensors writer raises its own error type, with the OS error only in its text."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        code = getattr(e, "errno", None)
        if code is None and (match := _OS_ERROR.search(str(e))):
            code = int(match[1])
        if code is None:
            raise
        text = os.strerror(code)
        if code in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free
            text += f" (needed about {needed_bytes / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free there)"
        elif code == errno.EFBIG:
            # a file-size limit (ulimit -f), not the disk
            text += f" (needed files of about {needed_bytes / 2**20:.1f} MiB in all; check ulimit -f)"
        raise OSError(code, text, str(path)) from e


def _split_optimizer_state(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"state": scalars, "param_groups": sd["param_groups"]}


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    state: TrainState,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    meta: dict[str, Any],
    total_limit: int,
) -> Path:
    """Write checkpoint `state.global_step` atomically from the main process, with `meta` (topology, seed, config)
    beside the counters in state.json; every rank must call this (it synchronises)."""
    final = checkpoint_dir(output_dir, state.global_step)
    tmp = final.with_name(final.name + ".tmp")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        weights = trainable_state(unet)
        opt_tensors, opt_json = _split_optimizer_state(optimizer)
        needed = sum(t.nbytes for t in [*weights.values(), *opt_tensors.values()])
        try:
            with disk_errors(tmp, needed):
                tmp.mkdir(parents=True)
                save_file(weights, tmp / "model.safetensors")
                save_file(opt_tensors, tmp / "optimizer.safetensors")
                write_json(tmp / "optimizer.json", opt_json)
                sched = lr_scheduler.state_dict()
                # closures; rebuilt from the config
                sched.pop("lr_lambdas", None)
                scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
                write_json(
                    tmp / "state.json",
                    {
                        **meta,
                        **dataclasses.asdict(state),
                        "lr_scheduler": sched,
                        "grad_scaler": scaler,
                        "files": file_record(tmp),
                    },
                )
                _fsync_tree(tmp)
        except OSError:
            # the space a torn save holds goes back at once; the previous checkpoint is untouched
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_dir(tmp, final)
        # only this run's own: another run's checkpoints are never deleted
        if total_limit > 0:
            for old in list_checkpoints(output_dir, meta.get("run_id"))[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def data_topology(cfg: TrainConfig, world_size: int) -> dict[str, int]:
    """The run's TOPOLOGY_KEYS, as a checkpoint records them."""
    return {"world_size": world_size, **{key: getattr(cfg, key) for key in _TOPOLOGY_FIELDS}}


def check_topology(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}"
        for k in TOPOLOGY_KEYS
        if saved.get(k) != current[k]
    ]
    if diffs:
        raise InputError(
            f"cannot resume from {path}: the data position depends on the topology, which "
            f"differs ({'; '.join(diffs)}). Resume with the same settings."
        )


def load_trainable_weights(path: Path, unet: torch.nn.Module) -> None:
    """Copy a checkpoint's model.safetensors into `unet`, whose trainable parameters must match it by name."""
    weights = load_file(path / "model.safetensors")
    params = dict(unet.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise InputError(
            f"{path / 'model.safetensors'} does not match the model "
            f"(missing {missing[:5]}, unexpected {extra[:5]}); was it saved with another LoRA setting?"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def load_checkpoint(
    path: Path,
    accelerator: Accelerator,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
) -> TrainState:
    """Restore weights, optimizer, lr schedule and grad scaler in place; returns the counters. The checkpoint's
    topology and config were checked against the run's before (run_dir, check_topology)."""
    state = read_json(path / "state.json")
    load_trainable_weights(path, unet)
    opt_json = read_json(path / "optimizer.json")
    tensors = load_file(path / "optimizer.safetensors")
    per_param: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in opt_json["state"].items()}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        per_param.setdefault(int(idx), {})[name] = value
    if len(opt_json["param_groups"]) != len(optimizer.param_groups):
        raise InputError(
            f"{path}: {len(opt_json['param_groups'])} optimizer parameter groups, the model has "
            f"{len(optimizer.param_groups)}"
        )
    # hyper-parameters (lr, betas, weight decay, ...) are the command line's: the checkpoint supplies only state
    optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})
    in_parameter_layouts(optimizer)
    sched = dict(state["lr_scheduler"])
    sched["lr_lambdas"] = [None] * len(sched["base_lrs"])
    sched["base_lrs"] = [group["initial_lr"] for group in optimizer.param_groups]
    lr_scheduler.load_state_dict(sched)
    lrs = [
        base * f(lr_scheduler.last_epoch)
        for base, f in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True)
    ]
    # where the (possibly new) schedule stands at the checkpoint's step
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    lr_scheduler._last_lr = lrs
    if accelerator.scaler is not None and state.get("grad_scaler"):
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    return TrainState.from_json(state)


def in_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded moment its parameter's memory layout (checkpoints store them contiguous): the fused AdamW
    kernel walks parameter and moments as flat memory, so a channels-last weight beside a contiguous moment would
    be updated with another element's moments."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def export_final(
    accelerator: Accelerator,
    denoiser: torch.nn.Module,
    output_dir: str | Path,
    family: Family,
    run_info: dict[str, Any] | None = None,
) -> Path:
    """`OUT/final/unet/` or `OUT/final/transformer/` (the merged denoiser, diffusers layout) and, for LoRA,
    `OUT/final/lora/` loadable by the family's `pipe.load_lora_weights`, plus `OUT/final/run.json` (`run_info`: what
    `trainer.evaluate` checks the held-out data against). Each folder is written aside and renamed into place."""
    final = Path(output_dir) / FINAL
    if accelerator.is_main_process:
        needed = sum(p.nbytes for p in denoiser.parameters())
        with disk_errors(final, needed):
            final.mkdir(parents=True, exist_ok=True)
            if run_info is not None:
                write_json(final / EXPORT_RECORD, run_info)
            if has_lora(denoiser):
                lora_tmp = final / "lora.tmp"
                shutil.rmtree(lora_tmp, ignore_errors=True)
                layers = get_peft_model_state_dict(denoiser)
                # as diffusers' training scripts save them: the UNet pipelines' loaders read diffusers' own key names
                # (train_dreambooth_lora_sdxl.py converts), SD3's and FLUX's read peft's (their scripts do not)
                if family.denoiser == "unet":
                    layers = convert_state_dict_to_diffusers(layers)
                # unet_lora_layers= for the SD pipelines, transformer_lora_layers= for SD3 and FLUX
                getattr(diffusers, family.pipeline).save_lora_weights(
                    lora_tmp, **{f"{family.denoiser}_lora_layers": layers}
                )
                publish_dir(lora_tmp, final / "lora")
                denoiser = copy.deepcopy(denoiser)
                denoiser.fuse_lora()
                denoiser.unload_lora()
            denoiser_tmp = final / f"{family.denoiser}.tmp"
            shutil.rmtree(denoiser_tmp, ignore_errors=True)
            # safetensors stores contiguous tensors only: a channels-last run ends here, so convert in place
            denoiser.to(memory_format=torch.contiguous_format)
            denoiser.save_pretrained(denoiser_tmp, safe_serialization=True)
            publish_dir(denoiser_tmp, final / family.denoiser)
    accelerator.wait_for_everyone()
    return final
