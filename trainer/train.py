"""Diffusion-DPO (or SFT / plain diffusion) over precomputed latent pairs: one loop, read top to bottom.

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
import math
import sys
import time
from dataclasses import asdict

import torch
from accelerate import Accelerator, PartialState
from tqdm.auto import tqdm

from schemas.atomic import read_json
from schemas.config import TrainConfig, parse_config
from schemas.manifest import Manifest
from trainer.checkpoint import check_topology, export_final, load_checkpoint, resolve_resume, save_checkpoint
from trainer.data import LatentPairStream, make_loader
from trainer.evaluate import evaluate
from trainer.losses import (
    diffusion_loss,
    dpo_logits,
    dpo_loss,
    implicit_accuracy,
    reward_margin,
    sft_loss,
)
from trainer.metrics import MetricWindow
from trainer.model import draw_noise, load_models, pair_errors, reference_errors, to_device
from trainer.optim import build_lr_scheduler, build_optimizer, effective_lr

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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
    if cfg.loss not in ("dpo", "sft", "diffusion"):
        problems.append(f"--loss must be one of ('dpo', 'sft', 'diffusion'), got {cfg.loss!r}")
    if cfg.mixed_precision not in _DTYPES:
        problems.append(f"--mixed-precision must be one of {tuple(_DTYPES)}, got {cfg.mixed_precision!r}")
    if min(cfg.max_steps, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.log_every) < 1:
        problems.append("max_steps, batch_size, gradient_accumulation_steps and log_every must be >= 1")
    if cfg.lora_rank < 0 or cfg.checkpoint_every < 0 or cfg.eval_every < 0:
        problems.append("lora_rank, checkpoint_every and eval_every must be >= 0")
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


def objective(
    cfg: TrainConfig,
    pol: tuple[torch.Tensor, torch.Tensor],
    ref: tuple[torch.Tensor, torch.Tensor] | None,
    label: torch.Tensor,
) -> tuple[torch.Tensor, dict]:
    """The loss and its per-micro-step metrics (batch means, detached)."""
    stats = {"policy_err_w": pol[0].mean(), "policy_err_l": pol[1].mean()}
    if cfg.loss == "sft":
        return sft_loss(pol[0]), stats
    if cfg.loss == "diffusion":
        return diffusion_loss(*pol), stats
    assert ref is not None
    h = dpo_logits(*pol, *ref, cfg.beta)
    stats.update(
        ref_err_w=ref[0].mean(),
        ref_err_l=ref[1].mean(),
        implicit_accuracy=implicit_accuracy(h).mean(),
        reward_margin=reward_margin(*pol, *ref).mean(),
    )
    return dpo_loss(*pol, *ref, beta=cfg.beta, label=label), stats


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainConfig, argv, __doc__.split("\n\n")[0])
    check_config(cfg)
    if cfg.data_only:
        return run_data_only(cfg)

    accelerator = Accelerator(
        cpu=_NO_GPU,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=cfg.output_dir,
        step_scheduler_with_optimizer=False,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    is_sdxl = Manifest.load(cfg.data).model_family == "sdxl"

    # --- models, optimizer, schedule (LoRA init draws from the global RNG, so seed it identically everywhere)
    torch.manual_seed(cfg.seed)
    models = load_models(
        cfg.model,
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        need_reference=cfg.loss == "dpo",
        gradient_checkpointing=cfg.gradient_checkpointing,
        reference_dtype=_DTYPES[cfg.mixed_precision],
    )
    if models.reference is not None:
        models.reference.to(accelerator.device)
    lr = effective_lr(cfg, world)
    optimizer = build_optimizer((p for p in models.policy.parameters() if p.requires_grad), cfg, lr)
    lr_scheduler = build_lr_scheduler(optimizer, cfg)
    unet, optimizer = accelerator.prepare(models.policy, optimizer)
    policy = accelerator.unwrap_model(unet)

    # --- resume: weights, optimizer, schedule and the exact data position, in O(1)
    topology = {"world_size": world, "batch_size": cfg.batch_size, "num_workers": cfg.num_workers}
    global_step = skipped_steps = batches_consumed = 0
    resume_from = resolve_resume(cfg.resume, cfg.output_dir) if cfg.resume else None
    if resume_from is not None:
        check_topology(resume_from, read_json(resume_from / "state.json"), topology)
        state = load_checkpoint(resume_from, accelerator, policy, optimizer, lr_scheduler)
        global_step, skipped_steps = state["global_step"], state["skipped_steps"]
        batches_consumed = state["batches_consumed"]
        accelerator.print(f"resumed from {resume_from} at step {global_step}")
    batches = iter(
        make_loader(
            make_stream(cfg, rank, world, batches_consumed), pin_memory=accelerator.device.type == "cuda"
        )
    )
    if cfg.fixed_batch:  # the step without the input pipeline, for the data-path overhead benchmark
        batches = itertools.repeat(to_device(next(batches), accelerator.device))

    if cfg.report_to != "none":
        accelerator.init_trackers(
            "train", config={k: v for k, v in asdict(cfg).items() if isinstance(v, int | float | str | bool)}
        )

    def run_eval() -> dict[str, float]:
        result = {}
        if accelerator.is_main_process:
            result = evaluate(
                models,
                policy,
                cfg.val_data,
                batch_size=cfg.batch_size,
                max_pairs=cfg.eval_max_pairs,
                seed=cfg.seed,
                beta=cfg.beta,
                draws=cfg.eval_draws,
                device=accelerator.device,
                autocast=accelerator.autocast,
            )
            accelerator.log({f"eval/{k}": v for k, v in result.items()}, step=global_step)
            accelerator.print("eval " + json.dumps({k: round(v, 6) for k, v in result.items()}))
        accelerator.wait_for_everyone()
        return result

    def checkpoint() -> None:
        save_checkpoint(
            accelerator,
            cfg.output_dir,
            global_step,
            policy,
            optimizer,
            lr_scheduler,
            {
                **topology,
                "skipped_steps": skipped_steps,
                "batches_consumed": batches_consumed,
                "seed": cfg.seed,
                "config": asdict(cfg),
            },
            cfg.checkpoints_total_limit,
        )

    # --- the loop: one optimizer step = gradient_accumulation_steps micro-batches per process
    num_t = models.scheduler.config.num_train_timesteps
    window = MetricWindow()
    progress = tqdm(
        total=cfg.max_steps,
        initial=global_step,
        disable=not accelerator.is_main_process,
        desc=cfg.loss,
        mininterval=PROGRESS_INTERVAL_S,
    )
    run_start = time.perf_counter()
    steps_this_run = 0
    eval_result: dict[str, float] = {}
    while global_step < cfg.max_steps:
        step_start = time.perf_counter()
        finite = True
        for _ in range(cfg.gradient_accumulation_steps):
            wait_start = time.perf_counter()
            batch = next(batches)
            window.add_wait(time.perf_counter() - wait_start)
            noise, timesteps = draw_noise(batch, num_t, seed=cfg.seed, rank=rank, micro_step=batches_consumed)
            batches_consumed += 1
            batch = to_device(batch, accelerator.device)
            noise, timesteps = noise.to(accelerator.device), timesteps.to(accelerator.device)
            with accelerator.accumulate(unet):
                with accelerator.autocast():
                    ref = (
                        reference_errors(models, policy, batch, noise, timesteps)
                        if cfg.loss == "dpo"
                        else None
                    )
                    pol = pair_errors(unet, models.scheduler, batch, noise, timesteps)
                loss, stats = objective(cfg, pol, ref, batch["label"])
                finite &= bool(torch.isfinite(loss))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), max_norm)
                    finite &= bool(torch.isfinite(grad_norm))
                    # every rank must agree, or the replicas would diverge
                    bad = accelerator.reduce(
                        torch.tensor(float(not finite), device=accelerator.device), "sum"
                    )
                    if bad.item() == 0:
                        optimizer.step()
                    else:
                        skipped_steps += 1
                        if (
                            accelerator.scaler is not None
                        ):  # fp16: lower the loss scale, as a scaler skip would
                            accelerator.scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    lr_scheduler.step()
            window.add(loss=loss, **stats)
        global_step += 1
        steps_this_run += 1
        window.add_step(
            time.perf_counter() - step_start,
            pairs=cfg.batch_size * cfg.gradient_accumulation_steps * world,
            grad_norm=float(grad_norm),
        )
        progress.update(1)

        if global_step % cfg.log_every == 0 or global_step == cfg.max_steps:
            logs = window.summary(accelerator)
            logs.update(lr=lr_scheduler.get_last_lr()[0], skipped_steps=skipped_steps)
            accelerator.log(logs, step=global_step)
            progress.set_postfix(
                {k: f"{logs[k]:.4g}" for k in ("loss", "implicit_accuracy", "pairs_per_s") if k in logs}
            )
        if cfg.checkpoint_every and (global_step % cfg.checkpoint_every == 0 or global_step == cfg.max_steps):
            checkpoint()
        if cfg.val_data and (
            (cfg.eval_every and global_step % cfg.eval_every == 0) or global_step == cfg.max_steps
        ):
            eval_result = run_eval()
    progress.close()

    seconds = time.perf_counter() - run_start
    export_final(accelerator, policy, cfg.output_dir, is_sdxl)
    # Release DDP, then the process group, while every rank is still alive: a gloo group left to the interpreter's
    # exit after its peer has gone can hang forever in its destructor (seen with torchrun on 2 CPUs).
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    del unet  # the DDP wrapper owns the reducer that holds the group
    accelerator.end_training()  # stops the trackers and destroys the process group
    pairs = steps_this_run * cfg.batch_size * cfg.gradient_accumulation_steps * world
    summary = {
        "global_step": global_step,
        "skipped_steps": skipped_steps,
        "steps_this_run": steps_this_run,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(pairs / seconds, 2) if seconds > 0 else None,
        "final": f"{cfg.output_dir}/final",
        **{f"eval_{k}": v for k, v in eval_result.items()},
    }
    if accelerator.device.type == "cuda":
        summary["max_memory_gib"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 2)
    accelerator.print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
