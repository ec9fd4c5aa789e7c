"""What an `--output-dir` holds and who may write it: one run, identified by a run id, owned by one trainer at a time.

`OUT/run.json` names the run (its id, model and a summary of its data); every checkpoint's state.json repeats the
id. So a fresh start never writes over another run, pruning only ever deletes the current run's own checkpoints, and
`--resume latest` only continues the run the directory holds. `OUT/.lock` is held (lockf) by the main process for
the whole run: a second trainer on the same directory stops at once instead of interleaving checkpoints.

`preflight` decides where a run starts from these files alone, before anything is written. On resume, each
TrainConfig field is compared by its rule (schemas.options.Resume): `applied` ones come from the command line and
each change is printed; any other change (the loss, β, the seed, the batch topology, LoRA, the optimizer) is
refused, naming the keys; the data and the model are compared by content.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.config import TrainConfig
from schemas.dir_lock import DirLock
from schemas.errors import InputError
from schemas.families import FAMILIES, Family
from schemas.loss_table import default_beta, family_setting
from schemas.manifest import Manifest
from schemas.model_folder import denoiser_parts, resolve_model
from schemas.options import Resume, flag_of, rules
from schemas.storage import read_json, write_json
from trainer.checkpoint import (
    CHECKPOINTS,
    FINAL,
    check_topology,
    checkpoint_problem,
    data_topology,
    list_checkpoints,
)
from trainer.model import check_data_fits_model

# OUT/run.json: the id, model and data summary of the run the directory holds
RUN_RECORD = "run.json"
LOCK_FILE = ".lock"
# accelerate's tensorboard logs of the run, `accelerator.init_trackers(TRACKER_DIR)`
TRACKER_DIR = "train"
RESUME_RULES = rules(TrainConfig)


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
    if (out / RUN_RECORD).is_file():
        found.append(f"run {read_json(out / RUN_RECORD).get('run_id')}")
    if checkpoints := list_checkpoints(out):
        found.append(f"{len(checkpoints)} checkpoints up to {checkpoints[-1].name}")
    if (out / FINAL).exists():
        found.append("a final/ export")
    return ", ".join(found) or None


def current_run_id(output_dir: str | Path) -> str | None:
    path = Path(output_dir) / RUN_RECORD
    return read_json(path).get("run_id") if path.is_file() else None


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def newest_intact(checkpoints: list[Path]) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files pass checkpoint_problem, and a line for each newer one that does not."""
    notes = []
    for path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            if notes:
                notes.append(f"--resume latest: falling back to {path}, the newest intact checkpoint")
            return path, notes
        notes.append(f"warning: checkpoint {path} is damaged ({problem}); not resuming from it")
    return None, notes


def choose_start(cfg: TrainConfig) -> tuple[Path | None, str, list[str]]:
    """The checkpoint to resume from (None: start at step 0), the run id this process continues or starts, and
    lines to print (damaged checkpoints passed over by `--resume latest`).

    Refuses, before any work, every case that would mix two runs in one directory, and a damaged checkpoint named
    by `--resume DIR` or the only ones `latest` could take."""
    out = Path(cfg.output_dir)
    held = holds_run(out)
    if cfg.overwrite_output_dir:
        if cfg.resume:
            raise InputError("--overwrite-output-dir starts a new run; it cannot be combined with --resume")
        return None, new_run_id(), []
    if not cfg.resume:
        if held:
            raise InputError(
                f"--output-dir {out} already holds a run ({held}); pass --resume latest to continue it, "
                "--overwrite-output-dir to replace it, or choose another --output-dir"
            )
        return None, new_run_id(), []
    run_id = current_run_id(out)
    # no run.json (checkpoints copied in without it): the run they agree on
    if run_id is None:
        ids = {read_json(p / "state.json").get("run_id") for p in list_checkpoints(out)}
        if len(ids) > 1:
            raise InputError(
                f"--output-dir {out} holds checkpoints of several runs ({sorted(map(str, ids))}); "
                "pass --resume with the checkpoint directory to continue one of them"
            )
        run_id = next(iter(ids), None)
    if cfg.resume == "latest":
        own = list_checkpoints(out, run_id=run_id) if run_id else []
        intact, notes = newest_intact(own)
        if intact is not None:
            return intact, run_id, notes
        if own:
            raise InputError(
                f"--resume latest: every checkpoint of run {run_id} in {out} is damaged "
                f"({'; '.join(notes)}); pass --overwrite-output-dir to start again"
            )
        if (out / FINAL).exists() or list_checkpoints(out):
            raise InputError(
                f"--resume latest: {out} holds {held}, but no checkpoint of its run "
                f"{run_id or '(none recorded)'}; pass --overwrite-output-dir to start again"
            )
        # killed before its first checkpoint: start it again
        return None, run_id or new_run_id(), []
    path = Path(cfg.resume)
    if not (path / "state.json").is_file():
        raise InputError(f"--resume {path}: no state.json there; not a complete checkpoint")
    theirs = read_json(path / "state.json").get("run_id")
    if theirs is None:
        raise InputError(
            f"--resume {path}: its state.json records no run id (written by an earlier version); start a new run"
        )
    if held and run_id != theirs:
        raise InputError(
            f"--resume {path} is a checkpoint of run {theirs}, but --output-dir {out} holds another run ({held}); "
            "resume into an empty --output-dir or that run's own"
        )
    if problem := checkpoint_problem(path):
        raise InputError(
            f"--resume {path}: the checkpoint is damaged ({problem}); resume from an earlier one"
        )
    return path, theirs, []


def with_resolved_beta(config: dict[str, Any], family: str) -> dict[str, Any]:
    """β unset means the loss's published value, so giving that value explicitly on resume is no change."""
    if config["beta"] is None:
        return {**config, "beta": default_beta(config["loss"], family)}
    return config


def check_resume_config(
    path: Path, saved: dict[str, Any], cfg: TrainConfig, data: dict[str, Any]
) -> list[str]:
    """Refuse changes that would corrupt the run; return the allowed ones as lines to print. A field the checkpoint
    does not record compares as None (its value unknown): refused unless its rule applies it."""
    old = with_resolved_beta(saved["config"], data["model_family"])
    new = with_resolved_beta(asdict(cfg), data["model_family"])
    refused = []
    changed = []
    for key, value in new.items():
        rule = RESUME_RULES[key]
        if rule is Resume.NOT_COMPARED or old.get(key) == value:
            continue
        line = f"{key}: checkpoint {old.get(key)!r}, now {value!r}"
        (changed if rule is Resume.APPLIED else refused).append(line)
    if saved["data"]["fingerprint"] != data["fingerprint"]:
        refused.append(
            f"data: {cfg.data} is not the data the run trained on (fingerprint {data['fingerprint']}, "
            f"checkpoint {saved['data']['fingerprint']})"
        )
    if saved["model"] != model_id(cfg.model):
        refused.append(f"model: checkpoint {saved['model']!r}, now {model_id(cfg.model)!r}")
    if refused:
        raise InputError(
            f"cannot resume from {path}: these settings would change what the run trains ({'; '.join(refused)}). "
            "Resume with the run's settings, or start a new run in another --output-dir"
        )
    return [f"resume: {line} (applied)" for line in changed]


@dataclass(frozen=True)
class Start:
    """Where a run starts, decided from files alone before any process group, model or output is touched."""

    # None: step 0
    resume_from: Path | None
    run_id: str
    # run_dir.data_summary of --data
    data: dict[str, Any]
    topology: dict[str, int]
    # hyper-parameters changed on resume, as lines to print
    changes: list[str]
    # damaged checkpoints passed over, as lines for stderr
    notes: list[str]


# what applies to one kind of family only, so that setting it for another is an error rather than ignored
FLOW_FLAGS = ("timestep_sampling", "logit_mean", "logit_std", "mode_scale", "guidance")


def check_family_flags(cfg: TrainConfig, family: Family) -> None:
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    changed = [name for name in FLOW_FLAGS if getattr(cfg, name) != defaults[name]]
    if not family.is_flow and changed:
        raise InputError(
            f"only the flow-matching families (SD3, FLUX) take {', '.join(flag_of(n) for n in changed)}; "
            f"--model {cfg.model} is {family.name}"
        )
    if "guidance" in changed and not family.packed:
        raise InputError(f"--guidance applies to FLUX models; --model {cfg.model} is {family.name}")


def check_library_choices(cfg: TrainConfig) -> None:
    """The names only a library knows, resolved now rather than after the run directory was claimed:
    `--lr-scheduler` against diffusers' SchedulerType (piecewise_constant needs step rules this trainer does not
    take), `--report-to` against accelerate's trackers and what this environment has installed."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType
    from diffusers.optimization import SchedulerType

    schedules = [s.value for s in SchedulerType if s is not SchedulerType.PIECEWISE_CONSTANT]
    if cfg.lr_scheduler not in schedules:
        raise InputError(f"--lr-scheduler {cfg.lr_scheduler!r}: not one of diffusers' schedules {schedules}")
    trackers = [t.value for t in LoggerType]
    if cfg.report_to not in ("none", *trackers):
        raise InputError(
            f"--report-to {cfg.report_to!r}: not one of accelerate's trackers {['none', *trackers]}"
        )
    installed = [t.value for t in get_available_trackers()]
    if cfg.report_to not in ("none", "all", *installed):
        raise InputError(
            f"--report-to {cfg.report_to}: its package is not installed here (installed trackers: "
            f"{installed or 'none'}); install it or pass --report-to none"
        )


def preflight(cfg: TrainConfig, world_size: int) -> Start:
    """Every check that needs no model weights loaded: the flags only a library can check, the model folder, data
    and held-out data against the model and each other, the loss against the model family, the output directory,
    and what a resume may change. Raises InputError naming the flag or file."""
    check_library_choices(cfg)
    resolve_model(cfg.model, denoiser_parts)
    manifest = check_data_fits_model(cfg.data, "--data", cfg.model)
    family_setting(cfg.loss, manifest.model_family)
    check_family_flags(cfg, FAMILIES[manifest.model_family])
    if cfg.val_data:
        val = check_data_fits_model(cfg.val_data, "--val-data", cfg.model)
        if val.resolution != manifest.resolution or val.latent_shape != manifest.latent_shape:
            raise InputError(
                f"--val-data {cfg.val_data} was encoded at resolution {val.resolution}, --data {cfg.data} at "
                f"{manifest.resolution}: held-out numbers would measure the resolution change. Encode both at the "
                "same resolution"
            )
    data = data_summary(cfg.data)
    topology = data_topology(cfg, world_size)
    resume_from, run_id, notes = choose_start(cfg)
    changes = []
    if resume_from is not None:
        saved = read_json(resume_from / "state.json")
        check_topology(resume_from, saved, topology)
        changes = check_resume_config(resume_from, saved, cfg, data)
    return Start(resume_from, run_id, data, topology, changes, notes)


def begin_run(cfg: TrainConfig, run_id: str, data: dict[str, Any]) -> None:
    """Main process, after every check passed: clear a replaced run, then record this one."""
    out = Path(cfg.output_dir)
    if cfg.overwrite_output_dir:
        for name in (CHECKPOINTS, FINAL, TRACKER_DIR, RUN_RECORD):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    if current_run_id(out) != run_id:
        write_json(
            out / RUN_RECORD,
            {
                "run_id": run_id,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "model": model_id(cfg.model),
                "data": data,
            },
        )
    # a save killed half-way; never a checkpoint
    for stale in (out / CHECKPOINTS).glob("step_*.tmp") if (out / CHECKPOINTS).is_dir() else []:
        shutil.rmtree(stale)


def lock_output_dir(output_dir: str | Path) -> DirLock:
    """Hold `OUT/.lock` until the returned lock is closed (schemas/dir_lock.py: released however the process dies,
    not inherited by forked DataLoader workers). A second trainer gets an InputError naming the holder."""

    def refusal(holder: str) -> str:
        return f"--output-dir {output_dir} is in use by another trainer ({holder}); wait for it or choose another"

    return DirLock(output_dir, LOCK_FILE, refusal)
