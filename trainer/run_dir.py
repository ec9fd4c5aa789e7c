"""What an `--output-dir` holds and who may write it: one run, identified by a run id, owned by one trainer at a time.

`OUT/run.json` names the run (its id, model and a summary of its data); every checkpoint's state.json repeats the
id. So a fresh start never writes over another run, pruning only ever deletes the current run's own checkpoints, and
`--resume latest` only continues the run the directory holds. `OUT/.lock` is held (lockf) by the main process for
the whole run: a second trainer on the same directory stops at once instead of interleaving checkpoints.

On resume, hyper-parameters in RESUMABLE come from the command line and each change is printed; any other change
(the loss, β, the data, the model, the seed, the batch topology, LoRA, the optimizer) is refused, naming the keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.config import TrainConfig
from schemas.dir_lock import DirLock
from schemas.errors import InputError
from schemas.manifest import Manifest
from schemas.storage import read_json, write_json
from trainer.checkpoint import CHECKPOINTS, list_checkpoints
from trainer.losses import default_beta

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
TRACKER_DIR = "train"  # accelerate's tensorboard logs of the run, `accelerator.init_trackers("train")`

# may differ on resume: applied, and the change printed
RESUMABLE = (
    "learning_rate",
    "scale_lr",
    "lr_scheduler",
    "lr_warmup_steps",
    "max_steps",
    "max_grad_norm",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "mixed_precision",
    "gradient_checkpointing",
    "allow_tf32",
    "checkpoint_every",
    "checkpoints_total_limit",
    "log_every",
    "val_data",
    "eval_every",
    "eval_max_pairs",
    "eval_draws",
    "report_to",
    "max_skipped_fraction",
)
# where the run is, not what it is: never compared
_NOT_COMPARED = ("output_dir", "resume", "overwrite_output_dir", "data", "model", "fixed_batch", "data_only")


def data_summary(data_dir: str | Path) -> dict[str, Any]:
    """What a run trained on, by content: the fingerprint changes when the data are re-encoded or swapped, not when
    the directory moves."""
    m = Manifest.load(data_dir)
    content = {
        "shards": [[s.path, s.num_samples] for s in m.shards],
        "text_shards": [[s.path, s.num_samples] for s in m.text_shards],
        **{
            k: getattr(m, k)
            for k in ("model_family", "resolution", "latent_mode", "latent_shape", "flip_variants")
        },
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "fingerprint": digest,
        "num_samples": m.num_samples,
        "model_family": m.model_family,
        "resolution": m.resolution,
        "latent_shape": m.latent_shape,
    }


def model_id(model: str) -> str:
    """A local model folder by its absolute path (the same folder from another working directory compares equal),
    a hub id as given."""
    return os.path.abspath(model) if os.path.isdir(model) else model


def holds_run(output_dir: str | Path) -> str | None:
    """What in `output_dir` belongs to an earlier run (None when nothing does)."""
    out = Path(output_dir)
    found = []
    if (out / RUN_FILE).is_file():
        found.append(f"run {read_json(out / RUN_FILE).get('run_id')}")
    if checkpoints := list_checkpoints(out):
        found.append(f"{len(checkpoints)} checkpoints up to {checkpoints[-1].name}")
    if (out / "final").exists():
        found.append("a final/ export")
    return ", ".join(found) or None


def current_run_id(output_dir: str | Path) -> str | None:
    path = Path(output_dir) / RUN_FILE
    return read_json(path).get("run_id") if path.is_file() else None


def choose_start(cfg: TrainConfig) -> tuple[Path | None, str]:
    """The checkpoint to resume from (None: start at step 0) and the run id this process continues or starts.

    Refuses, before any work, every case that would mix two runs in one directory."""
    out = Path(cfg.output_dir)
    held = holds_run(out)
    if cfg.overwrite_output_dir:
        if cfg.resume:
            raise InputError("--overwrite-output-dir starts a new run; it cannot be combined with --resume")
        return None, uuid.uuid4().hex[:12]
    if not cfg.resume:
        if held:
            raise InputError(
                f"--output-dir {out} already holds a run ({held}); pass --resume latest to continue it, "
                "--overwrite-output-dir to replace it, or choose another --output-dir"
            )
        return None, uuid.uuid4().hex[:12]
    run_id = current_run_id(out)
    if (
        run_id is None
    ):  # no run.json (checkpoints copied in, or written before run ids): the run they agree on
        ids = {read_json(p / "state.json").get("run_id") for p in list_checkpoints(out)}
        if len(ids) > 1:
            raise InputError(
                f"--output-dir {out} holds checkpoints of several runs ({sorted(map(str, ids))}); "
                "pass --resume with the checkpoint directory to continue one of them"
            )
        run_id = next(iter(ids), None)
    if cfg.resume == "latest":
        own = list_checkpoints(out, run_id=run_id)
        if own:
            return own[-1], run_id or uuid.uuid4().hex[:12]  # a run from before run ids is adopted
        if (out / "final").exists() or list_checkpoints(out):
            raise InputError(
                f"--resume latest: {out} holds {held}, but no checkpoint of its run "
                f"{run_id or '(none recorded)'}; pass --overwrite-output-dir to start again"
            )
        return None, run_id or uuid.uuid4().hex[:12]  # killed before its first checkpoint: start it again
    path = Path(cfg.resume)
    if not (path / "state.json").is_file():
        raise InputError(f"--resume {path}: no state.json there; not a complete checkpoint")
    theirs = read_json(path / "state.json").get("run_id")
    if held and run_id != theirs:
        raise InputError(
            f"--resume {path} is a checkpoint of run {theirs}, but --output-dir {out} holds another run ({held}); "
            "resume into an empty --output-dir or that run's own"
        )
    return path, theirs or uuid.uuid4().hex[:12]


def with_resolved_beta(config: dict[str, Any], family: str) -> dict[str, Any]:
    """β unset means the loss's published value, so giving that value explicitly on resume is no change."""
    if config.get("beta") is None and "loss" in config:
        return {**config, "beta": default_beta(config["loss"], family)}
    return config


def check_resume_config(
    path: Path, saved: dict[str, Any], cfg: TrainConfig, data: dict[str, Any]
) -> list[str]:
    """Refuse changes that would corrupt the run; return the allowed ones as lines to print."""
    old = with_resolved_beta(saved.get("config", {}), data["model_family"])
    new = with_resolved_beta(asdict(cfg), data["model_family"])
    refused = []
    changed = []
    for key, value in new.items():
        if key in _NOT_COMPARED or key not in old or old[key] == value:
            continue
        line = f"{key}: checkpoint {old[key]!r}, now {value!r}"
        (changed if key in RESUMABLE else refused).append(line)
    if "data" in saved and saved["data"]["fingerprint"] != data["fingerprint"]:
        refused.append(
            f"data: {cfg.data} is not the data the run trained on (fingerprint {data['fingerprint']}, "
            f"checkpoint {saved['data']['fingerprint']})"
        )
    if "model" in saved and saved["model"] != model_id(cfg.model):
        refused.append(f"model: checkpoint {saved['model']!r}, now {model_id(cfg.model)!r}")
    if refused:
        raise InputError(
            f"cannot resume from {path}: these settings would change what the run trains ({'; '.join(refused)}). "
            "Resume with the run's settings, or start a new run in another --output-dir"
        )
    return [f"resume: {line} (applied)" for line in changed]


def begin_run(cfg: TrainConfig, run_id: str, data: dict[str, Any]) -> None:
    """Main process, after every check passed: clear a replaced run, then record this one."""
    out = Path(cfg.output_dir)
    if cfg.overwrite_output_dir:
        for name in (CHECKPOINTS, "final", TRACKER_DIR, RUN_FILE):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    if current_run_id(out) != run_id:
        write_json(
            out / RUN_FILE,
            {
                "run_id": run_id,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "model": model_id(cfg.model),
                "data": data,
            },
        )
    for stale in (out / CHECKPOINTS).glob("step_*.tmp") if (out / CHECKPOINTS).is_dir() else []:
        shutil.rmtree(stale)  # a save killed half-way; never a checkpoint


def lock_output_dir(output_dir: str | Path) -> DirLock:
    """Hold `OUT/.lock` until the returned lock is closed (schemas/dir_lock.py: released however the process dies,
    not inherited by forked DataLoader workers). A second trainer gets an InputError naming the holder."""

    def refusal(holder: str) -> str:
        return f"--output-dir {output_dir} is in use by another trainer ({holder}); wait for it or choose another"

    return DirLock(output_dir, LOCK_FILE, refusal)
