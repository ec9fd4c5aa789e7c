"""Checkpoints: pickle-free optimizer round trip, atomic layout, pruning, `latest`, topology refusal, run ids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from schemas.atomic import process_umask
from schemas.config import TrainConfig
from schemas.errors import InputError
from schemas.storage import read_json, write_json
from trainer.checkpoint import (
    TrainState,
    check_topology,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from trainer.optim import build_lr_scheduler, build_optimizer
from trainer.run_dir import choose_start


def _setup(optimizer: str, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    model[0].bias.requires_grad_(False)  # a frozen parameter must not shift optimizer indices
    cfg = TrainConfig(data="d", model="m", optimizer=optimizer, lr_warmup_steps=3, max_steps=10)
    opt = build_optimizer((p for p in model.parameters() if p.requires_grad), cfg, lr=1e-2)
    return model, opt, build_lr_scheduler(opt, cfg)


def _step(model, opt, sched, i: int) -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(i))
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    sched.step()


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_round_trip_continues_identically(tmp_path: Path, optimizer: str) -> None:
    accelerator = Accelerator()
    model, opt, sched = _setup(optimizer)
    for i in range(3):
        _step(model, opt, sched, i)
    saved = TrainState(global_step=3, micro_step=6, skipped_steps=1)
    topology = {"world_size": 1, "batch_size": 5, "num_workers": 0}
    path = save_checkpoint(accelerator, tmp_path, saved, model, opt, sched, topology, total_limit=2)
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "state.json",
    ]
    for i in range(3, 6):
        _step(model, opt, sched, i)

    fresh, opt2, sched2 = _setup(optimizer, seed=1)
    fresh[0].bias.data.copy_(model[0].bias)  # frozen weights come from the base model, not the checkpoint
    with pytest.raises(InputError, match="batch_size: checkpoint 5, now 4"):
        check_topology(path, read_json(path / "state.json"), {**topology, "batch_size": 4})
    check_topology(path, read_json(path / "state.json"), topology)
    assert load_checkpoint(path, accelerator, fresh, opt2, sched2) == saved
    assert sched2.get_last_lr() == pytest.approx([1e-2])  # warmup of 3 steps done
    for i in range(3, 6):
        _step(fresh, opt2, sched2, i)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_pruning_deletes_only_the_runs_own_checkpoints(tmp_path: Path) -> None:
    """Another run's checkpoints (higher step numbers, so they sort later) survive this run's pruning."""
    accelerator = Accelerator()
    model, opt, sched = _setup("adamw")
    _step(model, opt, sched, 0)

    def save(step: int, run_id: str) -> None:
        state = TrainState(global_step=step)
        save_checkpoint(accelerator, tmp_path, state, model, opt, sched, {"run_id": run_id}, total_limit=2)

    save(9, "other")
    for step in (1, 2, 3):
        save(step, "mine")
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000002", "step_00000003", "step_00000009"]
    assert [p.name for p in list_checkpoints(tmp_path, "mine")] == ["step_00000002", "step_00000003"]
    torn = tmp_path / "checkpoints" / "step_00000004.tmp"  # a save killed half-way
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(tmp_path, "mine")][-1] == "step_00000003"


def test_wrong_weights_are_refused(tmp_path: Path) -> None:
    accelerator = Accelerator()
    model, opt, sched = _setup("adamw")
    path = save_checkpoint(
        accelerator, tmp_path, TrainState(global_step=1), model, opt, sched, {}, total_limit=0
    )
    other = torch.nn.Sequential(torch.nn.Linear(4, 8))
    opt2 = build_optimizer(other.parameters(), TrainConfig(data="d", model="m"), lr=1e-2)
    with pytest.raises(InputError, match="does not match the model"):
        load_checkpoint(
            path, accelerator, other, opt2, build_lr_scheduler(opt2, TrainConfig(data="d", model="m"))
        )


def test_topology_mismatch_is_refused(tmp_path: Path) -> None:
    saved = json.loads(json.dumps({"world_size": 2, "batch_size": 4, "num_workers": 1}))
    check_topology(tmp_path, saved, dict(saved))
    with pytest.raises(InputError, match=r"world_size: checkpoint 2, now 1"):
        check_topology(tmp_path, saved, {**saved, "world_size": 1})


def test_files_follow_the_umask(tmp_path: Path) -> None:
    """safetensors writes 0600; published checkpoints must be readable by the group the umask allows."""
    accelerator = Accelerator()
    model, opt, sched = _setup("adamw")
    old = os.umask(0o002)
    try:
        assert process_umask() == 0o002
        path = save_checkpoint(
            accelerator, tmp_path, TrainState(global_step=1), model, opt, sched, {}, total_limit=0
        )
        write_json(tmp_path / "x.json", {})
    finally:
        os.umask(old)
    files = [*path.iterdir(), tmp_path / "x.json"]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o664" for f in files}


def test_a_checkpoint_without_a_run_id_is_not_adopted(tmp_path: Path) -> None:
    """Every checkpoint this trainer writes names its run; one that does not is refused, not adopted as the run."""
    step = tmp_path / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    write_json(step / "state.json", {"global_step": 1})
    with pytest.raises(InputError, match=r"no checkpoint of its run \(none recorded\)"):
        choose_start(TrainConfig(data="d", model="m", output_dir=str(tmp_path), resume="latest"))
    with pytest.raises(InputError, match=r"its state\.json records no run id"):
        choose_start(TrainConfig(data="d", model="m", output_dir=str(tmp_path / "new"), resume=str(step)))
