"""Diffusion-DPO and its follow-ups (`--loss`) over precomputed latent pairs: one loop, read top to bottom.

  python -m trainer.train --config configs/demo.toml --data OUT --model MODEL --output-dir RUN
  torchrun --nproc-per-node 2 -m trainer.train ...            (CPU processes, gloo)
  accelerate launch --num_processes 8 -m trainer.train ...    (GPUs)

The data loader stays out of `accelerator.prepare` (it is already rank-sharded), the frozen reference is never
prepared, and every random draw is seeded by (seed, rank, step): `--resume latest` continues bit-exactly from the
last checkpoint without replaying data.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict

import torch
from accelerate import Accelerator, PartialState
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm

from schemas.config import TrainConfig, parse_config
from schemas.manifest import Manifest
from schemas.sample import TORCH_DTYPES
from trainer.checkpoint import TrainState, export_final, load_checkpoint, resolve_resume, save_checkpoint
from trainer.data import LatentPairStream, make_loader
from trainer.evaluate import evaluate
from trainer.losses import REFERENCE_FREE, default_beta
from trainer.metrics import MetricWindow
from trainer.model import SDXL_TIME_IDS, Models, load_models, to_device
from trainer.objective import Objective, check_objective
from trainer.optim import build_lr_scheduler, build_optimizer, effective_lr
from trainer.step import Trainer, train_step

MIXED_PRECISION = ("no", "fp16", "bf16")  # accelerate's names
# accelerate only treats torchrun's processes as one CPU job (gloo) when told cpu=True
_NO_GPU = not torch.cuda.is_available()
# a terminal gets a live bar; a log file (CI, `ray job logs`) gets a line every 30 s instead of thousands of \r updates
PROGRESS_INTERVAL_S = 0.1 if sys.stderr.isatty() else 30.0


def check_config(cfg: TrainConfig) -> None:
    problems = []
    if not cfg.data:
        problems.append("--data is required")
    if not cfg.model and not cfg.data_only:
        problems.append("--model is required")
    problems += check_objective(cfg)
    if cfg.mixed_precision not in MIXED_PRECISION:
        problems.append(f"--mixed-precision must be one of {MIXED_PRECISION}, got {cfg.mixed_precision!r}")
    if min(cfg.max_steps, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.log_every) < 1:
        problems.append("max_steps, batch_size, gradient_accumulation_steps and log_every must be >= 1")
    if cfg.lora_rank < 0 or cfg.checkpoint_every < 0 or cfg.eval_every < 0:
        problems.append("lora_rank, checkpoint_every and eval_every must be >= 0")
    if cfg.sdxl_time_ids not in SDXL_TIME_IDS:
        problems.append(f"--sdxl-time-ids must be one of {SDXL_TIME_IDS}, got {cfg.sdxl_time_ids!r}")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def make_stream(cfg: TrainConfig, rank: int, world_size: int, start_batch: int) -> LatentPairStream:
    return LatentPairStream(
        cfg.data,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        start_batch=start_batch,
        caption_dropout=cfg.caption_dropout,
        shards_in_flight=cfg.shards_in_flight,
    )


def run_data_only(cfg: TrainConfig) -> int:
    """Time the input pipeline alone: max_steps batches, no model work. The first batch (worker start-up, first
    shard group) is timed apart, so pairs/s is the steady state a long run sees."""
    state = PartialState(cpu=_NO_GPU)
    start = time.perf_counter()
    batches = iter(make_loader(make_stream(cfg, state.process_index, state.num_processes, 0)))
    pairs = len(next(batches)["keys"])
    first_batch_s = time.perf_counter() - start
    steady_start = time.perf_counter()
    steady_pairs = 0
    for _, batch in zip(
        range(cfg.max_steps - 1),
        tqdm(
            batches,
            total=cfg.max_steps - 1,
            disable=not state.is_main_process,
            mininterval=PROGRESS_INTERVAL_S,
        ),
        strict=False,
    ):
        steady_pairs += len(batch["keys"])
    steady_s = time.perf_counter() - steady_start
    pairs += steady_pairs
    rate = steady_pairs / steady_s if steady_pairs else pairs / first_batch_s
    result = {
        "data_only": True,
        "rank": state.process_index,
        "batches": cfg.max_steps,
        "pairs": pairs,
        "first_batch_s": round(first_batch_s, 3),
        "seconds": round(first_batch_s + steady_s, 3),
        "pairs_per_s": round(rate, 2),
    }
    print(
        f"data only: {pairs} pairs in {first_batch_s + steady_s:.2f}s; first batch after {first_batch_s:.2f}s, "
        f"then {rate:.1f} pairs/s",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return 0


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The lr schedule is stepped by the step itself (once per optimizer step), never by accelerate."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    return Accelerator(
        cpu=_NO_GPU,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=cfg.output_dir,
        step_scheduler_with_optimizer=False,
    )


def build_trainer(cfg: TrainConfig, accelerator: Accelerator) -> Trainer:
    """Models, optimizer and schedule; LoRA's init draws from the global RNG, so it is seeded the same everywhere."""
    torch.manual_seed(cfg.seed)
    models = load_models(
        cfg.model,
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        need_reference=cfg.loss not in REFERENCE_FREE,
        gradient_checkpointing=cfg.gradient_checkpointing,
        reference_dtype=TORCH_DTYPES[cfg.mixed_precision],
        sdxl_time_ids=cfg.sdxl_time_ids,
    )
    if models.reference is not None:
        models.reference.to(accelerator.device)  # frozen, so never prepared (no DDP, no optimizer)
    lr = effective_lr(cfg, accelerator.num_processes)
    optimizer = build_optimizer((p for p in models.policy.parameters() if p.requires_grad), cfg, lr)
    lr_scheduler = build_lr_scheduler(optimizer, cfg)
    unet, optimizer = accelerator.prepare(models.policy, optimizer)
    policy = accelerator.unwrap_model(unet)
    family = Manifest.load(cfg.data).model_family
    objective = Objective.from_config(cfg, family, models.scheduler.config.num_train_timesteps)
    return Trainer(cfg, accelerator, models, unet, policy, optimizer, lr_scheduler, objective, family)


def resume(trainer: Trainer, topology: dict[str, int]) -> TrainState:
    """The counters of `--resume`'s checkpoint, its weights, optimizer and schedule loaded; a fresh state without."""
    cfg = trainer.cfg
    path = resolve_resume(cfg.resume, cfg.output_dir) if cfg.resume else None
    if path is None:
        return TrainState()
    state = load_checkpoint(
        path, trainer.accelerator, trainer.policy, trainer.optimizer, trainer.lr_scheduler, topology
    )
    trainer.accelerator.print(f"resumed from {path} at step {state.global_step}")
    return state


def training_batches(cfg: TrainConfig, accelerator: Accelerator, micro_step: int) -> Iterator[dict]:
    """The rank's stream from its data position, in O(1); with --fixed-batch the first batch, kept on the device,
    at every micro-step (the step without the input pipeline, for the data-path overhead benchmark)."""
    stream = make_stream(cfg, accelerator.process_index, accelerator.num_processes, micro_step)
    batches = iter(make_loader(stream, pin_memory=accelerator.device.type == "cuda"))
    if cfg.fixed_batch:
        return itertools.repeat(to_device(next(batches), accelerator.device))
    return batches


def every_or_last(step: int, every: int, last: int) -> bool:
    """Every `every` steps (never when 0) and at the last step."""
    return every > 0 and (step % every == 0 or step == last)


def should_log(cfg: TrainConfig, step: int) -> bool:
    return every_or_last(step, cfg.log_every, cfg.max_steps)


def should_checkpoint(cfg: TrainConfig, step: int) -> bool:
    return every_or_last(step, cfg.checkpoint_every, cfg.max_steps)


def should_evaluate(cfg: TrainConfig, step: int) -> bool:
    """With --val-data: every eval_every steps, and always at the end (also when eval_every is 0)."""
    return bool(cfg.val_data) and (
        step == cfg.max_steps or every_or_last(step, cfg.eval_every, cfg.max_steps)
    )


def log_window(trainer: Trainer, window: MetricWindow, state: TrainState, progress: tqdm) -> None:
    """The window's means over steps and ranks (a collective), to the trackers and the progress bar."""
    logs = window.summary(trainer.accelerator)
    logs.update(lr=trainer.lr_scheduler.get_last_lr()[0], skipped_steps=state.skipped_steps)
    trainer.accelerator.log(logs, step=state.global_step)
    progress.set_postfix(
        {k: f"{logs[k]:.4g}" for k in ("loss", "implicit_accuracy", "pairs_per_s") if k in logs}
    )


def checkpoint(trainer: Trainer, state: TrainState, topology: dict[str, int]) -> None:
    cfg = trainer.cfg
    save_checkpoint(
        trainer.accelerator,
        cfg.output_dir,
        state,
        trainer.policy,
        trainer.optimizer,
        trainer.lr_scheduler,
        {**topology, "seed": cfg.seed, "config": asdict(cfg)},
        cfg.checkpoints_total_limit,
    )


def eval_models(models: Models, policy: UNet2DConditionModel, model: str) -> Models:
    """The reference for held-out accuracy: the run's own, or for a reference-free full fine-tune (mapo, sft) the
    base UNet, loaded for the evaluation only, so that its implicit accuracy measures what training changed."""
    if models.reference is not None or models.is_lora:
        return models
    base = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(next(policy.parameters()).device)
    return Models(policy, base.requires_grad_(False).eval(), models.scheduler)


def evaluate_and_log(trainer: Trainer, step: int) -> dict[str, float]:
    """Held-out metrics from the main process (the others wait), logged and printed. The DPO loss among them uses
    the loss's β when it is on DPO's scale, else DPO's own."""
    cfg, accelerator, objective = trainer.cfg, trainer.accelerator, trainer.objective
    result = {}
    if accelerator.is_main_process:
        result = evaluate(
            eval_models(trainer.models, trainer.policy, cfg.model),
            trainer.policy,
            cfg.val_data,
            batch_size=cfg.batch_size,
            max_pairs=cfg.eval_max_pairs,
            seed=cfg.seed,
            beta=objective.beta if objective.needs_reference else default_beta("dpo", trainer.family),
            draws=cfg.eval_draws,
            device=accelerator.device,
            autocast=accelerator.autocast,
        )
        accelerator.log({f"eval/{k}": v for k, v in result.items()}, step=step)
        accelerator.print("eval " + json.dumps({k: round(v, 6) for k, v in result.items()}))
    accelerator.wait_for_everyone()
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainConfig, argv, __doc__.split("\n\n")[0])
    check_config(cfg)
    if cfg.data_only:
        return run_data_only(cfg)

    accelerator = make_accelerator(cfg)
    world = accelerator.num_processes
    trainer = build_trainer(cfg, accelerator)
    topology = {"world_size": world, "batch_size": cfg.batch_size, "num_workers": cfg.num_workers}
    state = resume(trainer, topology)
    batches = training_batches(cfg, accelerator, state.micro_step)
    if cfg.report_to != "none":
        accelerator.init_trackers(
            "train", config={k: v for k, v in asdict(cfg).items() if isinstance(v, int | float | str | bool)}
        )

    # the loop: one optimizer step = gradient_accumulation_steps micro-batches per process
    window = MetricWindow()
    progress = tqdm(
        total=cfg.max_steps,
        initial=state.global_step,
        disable=not accelerator.is_main_process,
        desc=cfg.loss,
        mininterval=PROGRESS_INTERVAL_S,
    )
    pairs_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world
    first_step, run_start = state.global_step, time.perf_counter()
    eval_result: dict[str, float] = {}
    while state.global_step < cfg.max_steps:
        window.add_step(train_step(trainer, state, batches), pairs=pairs_per_step)
        progress.update(1)
        if should_log(cfg, state.global_step):
            log_window(trainer, window, state, progress)
        if should_checkpoint(cfg, state.global_step):
            checkpoint(trainer, state, topology)
        if should_evaluate(cfg, state.global_step):
            eval_result = evaluate_and_log(trainer, state.global_step)
    progress.close()
    seconds = time.perf_counter() - run_start

    export_final(accelerator, trainer.policy, cfg.output_dir, trainer.family == "sdxl")
    # Release DDP, then the process group, while every rank is still alive: a gloo group left to the interpreter's
    # exit after its peer has gone can hang forever in its destructor (seen with torchrun on 2 CPUs).
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    del trainer  # its DDP wrapper owns the reducer that holds the group
    accelerator.end_training()  # stops the trackers and destroys the process group
    steps_this_run = state.global_step - first_step
    summary = {
        **asdict(state),
        "steps_this_run": steps_this_run,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(steps_this_run * pairs_per_step / seconds, 2) if seconds > 0 else None,
        "final": f"{cfg.output_dir}/final",
        **{f"eval_{k}": v for k, v in eval_result.items()},
    }
    if accelerator.device.type == "cuda":
        summary["max_memory_gib"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 2)
    accelerator.print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
