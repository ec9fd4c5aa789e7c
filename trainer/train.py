"""Diffusion-DPO and its follow-ups (`--loss`) over precomputed latent pairs: one loop, read top to bottom.

  python -m trainer.train --config configs/demo.toml --data OUT --model MODEL --output-dir RUN
  torchrun --nproc-per-node 2 -m trainer.train ...            (CPU processes, gloo)
  accelerate launch --num_processes 8 -m trainer.train ...    (GPUs)

The data loader stays out of `accelerator.prepare` (it is already rank-sharded), the frozen reference is never
prepared, and every random draw is seeded by (seed, rank, step): `--resume latest` continues bit-exactly from the
last checkpoint without replaying data.

Exit status: 0 done; 2 bad input (a flag, a file, data that do not fit the model, an output directory that holds
another run, damaged data), named in the message, checked before any work where it can be; 3 too many non-finite
steps (--max-skipped-fraction); 74 the environment failed a write or read (disk full, permission denied), named in
one line; 75 stopped by SIGTERM/SIGINT after writing a checkpoint (rerun with --resume latest).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from dataclasses import asdict

import torch
from accelerate import Accelerator, PartialState
from tqdm.auto import tqdm

from schemas.config import TrainConfig
from schemas.config_cli import parse_config
from schemas.errors import EXIT_INPUT, InputError
from schemas.failures import environment_exit
from schemas.loss_table import LOSSES, default_beta
from schemas.manifest import Manifest
from schemas.sample import TORCH_DTYPES
from trainer.checkpoint import FINAL, TrainState, export_final, load_checkpoint, save_checkpoint
from trainer.data import make_loader, make_stream
from trainer.data_only import run_data_only
from trainer.evaluate import evaluate, strict_json
from trainer.metrics import PROGRESS_INTERVAL_S, MetricWindow, RunClock
from trainer.model import Models, denoiser_class, load_models, to_device
from trainer.objective import Objective
from trainer.optim import build_lr_scheduler, build_optimizer, effective_lr
from trainer.preemption import EXIT_PREEMPTED, StopRequest
from trainer.run_dir import TRACKER_DIR, Start, begin_run, lock_output_dir, model_id, preflight
from trainer.samples import TrainingSamples
from trainer.speed import attention_backend, compile_in_place, to_channels_last
from trainer.step import Trainer, train_step

# accelerate only treats torchrun's processes as one CPU job (gloo) when told cpu=True
_NO_GPU = not torch.cuda.is_available()
# a terminal gets a live bar; a log file (CI, `ray job logs`) gets a line every 30 s instead of thousands of \r updates
EXIT_DIVERGED = 3
MIN_STEPS_FOR_FRACTION = 100


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


def denoising_settings(cfg: TrainConfig) -> dict[str, object]:
    """The config's settings of trainer.denoisers.Denoising (each family reads its own)."""
    return {
        "sdxl_time_ids": cfg.sdxl_time_ids,
        "timestep_sampling": cfg.timestep_sampling,
        "logit_mean": cfg.logit_mean,
        "logit_std": cfg.logit_std,
        "mode_scale": cfg.mode_scale,
        "guidance": cfg.guidance,
    }


def build_trainer(
    cfg: TrainConfig, accelerator: Accelerator, stop: StopRequest | None = None, models: Models | None = None
) -> Trainer:
    """Models, optimizer and schedule; LoRA's init draws from the global RNG, so it is seeded the same everywhere.
    `models`: built already instead of loaded from cfg.model (bench/gpu_flow.py: architectures at random init that
    are never written to disk)."""
    torch.manual_seed(cfg.seed)
    models = models or load_models(
        cfg.model,
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        need_reference=LOSSES[cfg.loss].reference,
        gradient_checkpointing=cfg.gradient_checkpointing,
        reference_dtype=TORCH_DTYPES[cfg.mixed_precision],
        **denoising_settings(cfg),
    )
    # frozen, so never prepared (no DDP, no optimizer)
    if models.reference is not None:
        models.reference.to(accelerator.device)
    if cfg.channels_last:
        to_channels_last(models.policy, models.reference)
    if cfg.compile:
        compile_in_place(cfg.compile_mode, accelerator.device, models.policy, models.reference)
    lr = effective_lr(cfg, accelerator.num_processes)
    optimizer = build_optimizer((p for p in models.policy.parameters() if p.requires_grad), cfg, lr)
    lr_scheduler = build_lr_scheduler(optimizer, cfg)
    prepared_policy, optimizer = accelerator.prepare(models.policy, optimizer)
    family = Manifest.load(cfg.data).model_family
    objective = Objective.from_config(cfg, family, models.scheduler.config.num_train_timesteps)
    return Trainer(
        cfg,
        accelerator,
        models,
        prepared_policy,
        optimizer,
        lr_scheduler,
        objective,
        family,
        stop or StopRequest(),
    )


def resume(trainer: Trainer, start: Start) -> TrainState:
    """The counters of the checkpoint preflight chose, its weights, optimizer and schedule loaded (hyper-parameters
    from the command line); a fresh state for step 0."""
    if start.resume_from is None:
        return TrainState()
    state = load_checkpoint(
        start.resume_from, trainer.accelerator, trainer.models.policy, trainer.optimizer, trainer.lr_scheduler
    )
    trainer.accelerator.print(
        f"resumed run {start.run_id} from {start.resume_from} at step {state.global_step}"
    )
    for line in start.changes:
        trainer.accelerator.print(line)
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


def checkpoint(trainer: Trainer, state: TrainState, start: Start) -> None:
    cfg = trainer.cfg
    save_checkpoint(
        trainer.accelerator,
        cfg.output_dir,
        state,
        trainer.models.policy,
        trainer.optimizer,
        trainer.lr_scheduler,
        {
            **start.topology,
            "seed": cfg.seed,
            "config": asdict(cfg),
            "run_id": start.run_id,
            "model": model_id(cfg.model),
            "data": start.data,
        },
        cfg.checkpoints_total_limit,
    )


def eval_models(models: Models, model: str) -> Models:
    """The reference for held-out accuracy: the run's own, or for a reference-free full fine-tune (mapo, sft) the
    base UNet, loaded for the evaluation only, so that its implicit accuracy measures what training changed."""
    if models.reference is not None or models.is_lora:
        return models
    device = next(models.policy.parameters()).device
    base = denoiser_class(models.family).from_pretrained(model, subfolder=models.family.denoiser).to(device)
    return Models(models.policy, base.requires_grad_(False).eval(), models.denoising)


def too_many_skipped(cfg: TrainConfig, state: TrainState, *, finished: bool) -> bool:
    """More than --max-skipped-fraction of the steps skipped; while running, counted against at least
    MIN_STEPS_FOR_FRACTION steps, so that a few early skips (fp16 loss-scale calibration) do not stop a run."""
    steps = state.global_step if finished else max(state.global_step, MIN_STEPS_FOR_FRACTION)
    return state.skipped_steps > cfg.max_skipped_fraction * steps


def report_skip(trainer: Trainer, state: TrainState, progress: tqdm) -> None:
    """A skipped step is visible when it happens: in the bar, as a log line, and in the trackers."""
    progress.set_description(f"{trainer.cfg.loss} ({state.skipped_steps} skipped)")
    if trainer.accelerator.is_main_process:
        progress.write(
            f"step {state.global_step}: non-finite loss or gradient, update skipped "
            f"({state.skipped_steps} of {state.global_step} steps so far)",
            file=sys.stderr,
        )
    trainer.accelerator.log({"skipped_steps": state.skipped_steps}, step=state.global_step)


def evaluate_and_log(trainer: Trainer, step: int) -> dict[str, float]:
    """Held-out metrics from the main process (the others wait), logged and printed. The DPO loss among them uses
    the loss's β when it is on DPO's scale, else DPO's own."""
    cfg, accelerator, objective = trainer.cfg, trainer.accelerator, trainer.objective
    result = {}
    if accelerator.is_main_process:
        result = evaluate(
            eval_models(trainer.models, cfg.model),
            trainer.models.policy,
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
        accelerator.print("eval " + strict_json({k: round(v, 6) for k, v in result.items()}))
    accelerator.wait_for_everyone()
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(TrainConfig, argv, __doc__.split("\n\n")[0])
        if cfg.data_only:
            return run_data_only(cfg)
        return claim_and_train(cfg)
    except InputError as e:
        print(f"error: {input_error_message(e)}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as e:
        return environment_exit(
            e,
            ". Nothing half-written was published: the last complete checkpoint is intact; fix this and rerun the "
            "same command with --resume latest",
        )


def input_error_message(e: InputError) -> str:
    """The message itself, also when a DataLoader worker raised it (torch then wraps the worker's traceback)."""
    text = str(e).strip()
    prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
    return text.splitlines()[-1].removeprefix(prefix) if "Original Traceback" in text else text


def claim_and_train(cfg: TrainConfig) -> int:
    """Every check first; then the output directory claimed (locked, the run recorded) and the run trained, with
    SIGTERM/SIGINT turned into a stop after the current step (also while the models load)."""
    # the checks come before the Accelerator, which would itself fail on an unknown tracker with a traceback
    start = preflight(cfg, PartialState(cpu=_NO_GPU).num_processes)
    samples = TrainingSamples.from_config(cfg)
    accelerator = make_accelerator(cfg)
    for line in start.notes:
        accelerator.print(line, file=sys.stderr)
    # every rank checked the directory before the main process claims it
    accelerator.wait_for_everyone()
    with StopRequest() as stop, attention_backend(cfg.attention_backend):
        lock = lock_output_dir(cfg.output_dir) if accelerator.is_main_process else None
        try:
            if accelerator.is_main_process:
                begin_run(cfg, start.run_id, start.data)
            accelerator.wait_for_everyone()
            return train_and_export(cfg, accelerator, start, stop, samples)
        finally:
            if lock is not None:
                lock.close()


def train_and_export(
    cfg: TrainConfig, accelerator: Accelerator, start: Start, stop: StopRequest, samples: TrainingSamples
) -> int:
    """In the claimed output directory: build, resume, the loop (log / checkpoint / evaluate / sample), the final
    export and the JSON summary; returns the exit status."""
    world = accelerator.num_processes
    trainer = build_trainer(cfg, accelerator, stop)
    state = resume(trainer, start)
    batches = training_batches(cfg, accelerator, state.micro_step)
    if cfg.report_to != "none":
        accelerator.init_trackers(
            TRACKER_DIR,
            config={k: v for k, v in asdict(cfg).items() if isinstance(v, int | float | str | bool)},
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
    clock = RunClock(pairs_per_step)
    eval_result: dict[str, float] = {}
    exit_code = 0
    # closed also when a step or a checkpoint raises, so that an error line starts on a line of its own
    samples.maybe(trainer, state.global_step)
    try:
        while state.global_step < cfg.max_steps:
            result = train_step(trainer, state, batches)
            window.add_step(result, pairs=pairs_per_step)
            clock.step()
            progress.update(1)
            if result.skipped:
                report_skip(trainer, state, progress)
            if should_log(cfg, state.global_step):
                log_window(trainer, window, state, progress)
            samples.maybe(trainer, state.global_step)
            preempted = result.stop and state.global_step < cfg.max_steps
            if should_checkpoint(cfg, state.global_step) or preempted:
                checkpoint(trainer, state, start)
            if preempted:
                exit_code = EXIT_PREEMPTED
                break
            if too_many_skipped(cfg, state, finished=False):
                exit_code = EXIT_DIVERGED
                break
            if should_evaluate(cfg, state.global_step):
                eval_result = evaluate_and_log(trainer, state.global_step)
    finally:
        progress.close()
    timing = clock.summary()
    if exit_code == 0 and too_many_skipped(cfg, state, finished=True):
        exit_code = EXIT_DIVERGED

    if exit_code != EXIT_PREEMPTED and state.global_step >= cfg.max_steps:
        run_info = {"run_id": start.run_id, "global_step": state.global_step, "data": start.data}
        export_final(accelerator, trainer.models.policy, cfg.output_dir, trainer.models.family, run_info)
    # stops the loader's workers now, not at interpreter exit
    del batches
    # Release DDP, then the process group, while every rank is still alive: a gloo group left to the interpreter's
    # exit after its peer has gone can hang forever in its destructor (seen with torchrun on 2 CPUs).
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    # its DDP wrapper owns the reducer that holds the group
    del trainer
    # stops the trackers and destroys the process group
    accelerator.end_training()
    summary = {
        **asdict(state),
        "steps_this_run": clock.steps,
        **timing,
        "final": f"{cfg.output_dir}/{FINAL}" if exit_code != EXIT_PREEMPTED else None,
        "exit_code": exit_code,
        **{f"eval_{k}": v for k, v in eval_result.items()},
    }
    if accelerator.device.type == "cuda":
        summary["max_memory_gib"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 2)
    accelerator.print(strict_json(summary))
    if exit_code == EXIT_PREEMPTED:
        accelerator.print(
            f"stopped by a signal after step {state.global_step}; checkpoint written. Continue with the same "
            "command plus --resume latest",
            file=sys.stderr,
        )
    elif exit_code == EXIT_DIVERGED:
        accelerator.print(
            f"error: {state.skipped_steps} of {state.global_step} steps had a non-finite loss or gradient, more "
            f"than --max-skipped-fraction {cfg.max_skipped_fraction}; check the data (NaN latents?) and the "
            "learning rate",
            file=sys.stderr,
        )
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
