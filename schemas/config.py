"""The two configuration objects; schemas/config_cli.py fills them from a file plus command-line flags.

Every field is also a flag (`snake_case` → `--kebab-case`) whose `--help` line is the field's `help`; `--config FILE`
(JSON or TOML) supplies values and the command line wins. Booleans take `--flag` / `--no-flag`. Every check of the
values lives in `__post_init__`, so a config built in code is checked exactly like one parsed from the command line:
a bad value is an InputError naming the flag (the CLIs print it and exit 2). A config-file value of the wrong type
or an unknown key is a usage error (exit 2) naming the key.

Every field also states what a changed value means (`option(rule=...)`, required; schemas/options.py): for
EncodeConfig whether it changes the output (`Rerun`), for TrainConfig what a resume does with it (`Resume`). The
`--loss` choices and the loss parameters' fields come from the loss table (schemas/loss_table.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

# the stages, bench/ and tests import the CLI helpers from here too
from schemas.config_cli import build_parser, load_config_file, parse_config  # noqa: F401
from schemas.loss_table import LOSSES, SDPO_LOSSES
from schemas.options import (
    Rerun,
    Resume,
    check,
    check_rules,
    field_problems,
    keys_with,
    loss_option,
    option,
)
from schemas.sample import LATENT_MODES

# The values the choice flags take; the stages and the trainer use these same tuples.
PREPROCESS_MODES = ("official", "fast")
ALPHA_MODES = ("convert", "white")
ENCODE_DTYPES = ("auto", "fp32", "fp16", "bf16")
TIE_POLICIES = ("drop", "keep")
INPUT_FORMATS = ("pickapic", "preference", "webdataset")
KTO_REFERENCE_POINTS = ("mismatched", "batch")
OPTIMIZERS = ("adamw", "adafactor")
# accelerate's names
MIXED_PRECISION = ("no", "fp16", "bf16")
SDXL_TIME_IDS = ("constant", "image")
TIMESTEP_SAMPLINGS = ("logit_normal", "uniform", "mode")
# speed options of the step (trainer/speed.py, trainer/optim.py)
COMPILE_MODES = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)  # torch.compile's
ADAMW_IMPLS = ("default", "foreach", "fused")  # default: torch's own choice (foreach on GPU, a loop on CPU)
ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")  # scaled_dot_product_attention kernels


@dataclass
class EncodeConfig:
    rule_kind: ClassVar[type[Rerun]] = Rerun
    src: str = option(
        "",
        "input: a directory, glob, brace pattern, comma-separated list or fsspec URL (s3://bucket/prefix)",
        required=True,
        rule=Rerun.OUTPUT,
    )
    format: str = option(
        "pickapic",
        "input layout: pickapic (parquet), preference (hub parquet) or webdataset (tars)",
        choices=INPUT_FORMATS,
        rule=Rerun.OUTPUT,
    )
    columns: str = option(
        "",
        "preference/webdataset: ROLE=NAME,... e.g. caption=prompt,chosen=chosen,rejected=rejected",
        rule=Rerun.OUTPUT,
    )
    out: str = option(
        "",
        "output directory or URL (pairs/, text/, manifest.json); a rerun resumes it",
        required=True,
        rule=Rerun.RUNTIME,
    )
    model: str = option(
        "",
        "diffusers model: a folder (SD1.5 or SDXL layout), a hub id, or models/tiny-sd15",
        required=True,
        rule=Rerun.OUTPUT,
    )
    resolution: int = option(
        512, "square training resolution in pixels, a multiple of 8", minimum=8, rule=Rerun.OUTPUT
    )
    latent_mode: str = option(
        "moments",
        "moments: VAE mean + logvar, a fresh latent sample per step; mean: half the bytes",
        choices=LATENT_MODES,
        rule=Rerun.OUTPUT,
    )
    flip: bool = option(
        True,
        "also cache latents of the horizontally flipped images (the official recipe flips)",
        rule=Rerun.OUTPUT,
    )
    preprocess: str = option(
        "official",
        "official: DiffusionDPO's decode, resize and crop bit for bit; fast: DCT-scaled JPEG decode (README)",
        choices=PREPROCESS_MODES,
        rule=Rerun.OUTPUT,
    )
    alpha: str = option(
        "convert",
        'convert: alpha dropped, as .convert("RGB") does (official); white: composited onto white',
        choices=ALPHA_MODES,
        rule=Rerun.OUTPUT,
    )
    dtype: str = option(
        "auto",
        "VAE / text-encoder compute dtype; auto: fp16 on GPU unless the VAE asks for fp32, else fp32",
        choices=ENCODE_DTYPES,
        rule=Rerun.OUTPUT,
    )
    tie_policy: str = option(
        "drop",
        "drop ties (label_0 = 0.5), or keep them as soft labels for the trainer",
        choices=TIE_POLICIES,
        rule=Rerun.OUTPUT,
    )
    shard_size: int = option(1000, "pair samples per tar", minimum=1, rule=Rerun.OUTPUT)
    text_shard_size: int = option(5000, "caption embeddings per text tar", minimum=1, rule=Rerun.OUTPUT)
    chunk_files: int = option(
        32,
        "input files per chunk: the unit of atomic publish and of skipping on rerun",
        minimum=1,
        rule=Rerun.OUTPUT,
    )
    decode_batch_size: int = option(32, "rows per JPEG-decode task", minimum=1, rule=Rerun.RUNTIME)
    encode_batch_size: int = option(
        16, "pairs per VAE call (4 images each with flips)", minimum=1, rule=Rerun.RUNTIME
    )
    text_batch_size: int = option(64, "captions per text-encoder call", minimum=1, rule=Rerun.RUNTIME)
    max_sequence_length: int | None = option(
        None,
        "SD3/FLUX: T5 tokens per caption (default: the pipeline's encode_prompt default, 256 SD3 / 512 FLUX)",
        minimum=1,
        rule=Rerun.OUTPUT,
    )
    # speed only, equal up to rounding (as the batch sizes are): BENCHMARKS_GPU.md measures them
    vae_channels_last: bool = option(False, "VAE in channels-last (NHWC) memory format", rule=Rerun.RUNTIME)
    vae_compile: bool = option(False, "torch.compile the VAE encoder (inductor)", rule=Rerun.RUNTIME)
    num_encoders: int = option(
        0, "encoder actors; 0: one per GPU, or one per 2 CPUs without GPUs", minimum=0, rule=Rerun.RUNTIME
    )
    ray_address: str | None = option(
        None,
        "Ray cluster to join (default: RAY_ADDRESS or a running cluster, else a private local one)",
        rule=Rerun.RUNTIME,
    )
    verbose: bool = option(
        False, "show Ray's own logging, worker output and per-operator progress bars", rule=Rerun.RUNTIME
    )

    def __post_init__(self) -> None:
        problems = field_problems(self)
        if self.resolution % 8:
            problems.append(
                f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {self.resolution}"
            )
        check(self, problems)

    @classmethod
    def runtime_keys(cls) -> frozenset[str]:
        """The fields that do not change what is written (Rerun.RUNTIME): not compared on a rerun."""
        return frozenset(keys_with(cls, Rerun.RUNTIME))


@dataclass
class TrainConfig:
    rule_kind: ClassVar[type[Resume]] = Resume
    data: str = option(
        "", "encode output directory or URL (has manifest.json)", required=True, rule=Resume.NOT_COMPARED
    )
    model: str = option(
        "",
        "base model in diffusers layout (folder, hub id or models/tiny-sd15): the reference and initial policy",
        required=True,
        rule=Resume.NOT_COMPARED,
    )
    output_dir: str = option(
        "runs/dpo", "run directory: checkpoints/, final/, tracker logs", rule=Resume.NOT_COMPARED
    )
    val_data: str | None = option(
        None, "held-out encode output, evaluated every --eval-every steps and at the end", rule=Resume.APPLIED
    )
    # objective
    loss: str = option(
        "dpo",
        "preference loss (README, 'Preference losses'); sft: preferred images only; diffusion: both, no pairs",
        choices=tuple(LOSSES),
        rule=Resume.REFUSED,
    )
    beta: float | None = option(
        None,
        "the loss's β (default: its published value for the model family)",
        positive=True,
        rule=Resume.REFUSED,
    )
    label_smoothing: float | None = loss_option("label_smoothing")
    dmpo_alpha: float | None = loss_option("dmpo_alpha")
    mapo_scale: float | None = loss_option("mapo_scale")
    mapo_temperature: float | None = loss_option("mapo_temperature")
    kto_lambda_desirable: float | None = loss_option("kto_lambda_desirable")
    kto_lambda_undesirable: float | None = loss_option("kto_lambda_undesirable")
    kto_reference_point: str = option(
        "mismatched",
        "kto z0 from mismatched image/caption pairs, or from the batch itself",
        choices=KTO_REFERENCE_POINTS,
        rule=Resume.REFUSED,
    )
    sdpo_mu: float = option(
        0.0,
        f"> 0: wrap {', '.join(SDPO_LOSSES[:-1])} or {SDPO_LOSSES[-1]} in the Diffusion-SDPO safeguard with this μ",
        minimum=0.0,
        maximum=1.0,
        rule=Resume.REFUSED,
    )
    caption_dropout: float = option(
        0.2,
        "probability that a pair is trained on the empty caption",
        minimum=0.0,
        maximum=1.0,
        rule=Resume.REFUSED,
    )
    # optimisation
    seed: int = option(
        0,
        "seed of data order, noise and LoRA init: a run is a pure function of it",
        minimum=0,
        rule=Resume.REFUSED,
    )
    max_steps: int = option(
        2000, "optimizer steps in total (a resumed run continues up to it)", minimum=1, rule=Resume.APPLIED
    )
    batch_size: int = option(1, "pairs per process per micro-step", minimum=1, rule=Resume.TOPOLOGY)
    gradient_accumulation_steps: int = option(
        1, "micro-steps per optimizer step", minimum=1, rule=Resume.REFUSED
    )
    learning_rate: float = option(
        1e-8, "learning rate (per pair and process with --scale-lr)", minimum=0.0, rule=Resume.APPLIED
    )
    scale_lr: bool = option(
        True,
        "multiply the lr by batch size × accumulation × processes, as the official launchers do",
        rule=Resume.APPLIED,
    )
    lr_scheduler: str = option(
        "constant_with_warmup",
        "diffusers schedule name (constant_with_warmup, cosine, …)",
        rule=Resume.APPLIED,
    )
    lr_warmup_steps: int = option(500, "optimizer steps of linear warmup", minimum=0, rule=Resume.APPLIED)
    optimizer: str = option(
        "adamw", "adamw, or adafactor (the official SDXL choice)", choices=OPTIMIZERS, rule=Resume.REFUSED
    )
    adam_beta1: float = option(0.9, "AdamW β1", minimum=0.0, maximum=1.0, rule=Resume.APPLIED)
    adam_beta2: float = option(0.999, "AdamW β2", minimum=0.0, maximum=1.0, rule=Resume.APPLIED)
    adam_weight_decay: float = option(
        1e-2, "weight decay (AdamW and Adafactor)", minimum=0.0, rule=Resume.APPLIED
    )
    adam_epsilon: float = option(1e-8, "AdamW ε", minimum=0.0, rule=Resume.APPLIED)
    max_grad_norm: float = option(
        1.0, "clip the gradient norm to this (0: no clipping)", minimum=0.0, rule=Resume.APPLIED
    )
    mixed_precision: str = option(
        "no",
        "accelerate mixed precision; the frozen reference is held in this dtype",
        choices=MIXED_PRECISION,
        rule=Resume.APPLIED,
    )
    gradient_checkpointing: bool = option(
        False, "recompute UNet activations in backward: less memory, more time", rule=Resume.APPLIED
    )
    allow_tf32: bool = option(
        True, "TF32 matmuls and convolutions on GPUs that have them", rule=Resume.APPLIED
    )
    # speed: each computes the same step up to rounding; off until measured (BENCHMARKS_GPU.md)
    compile: bool = option(
        False, "torch.compile the policy and reference UNets (inductor)", rule=Resume.APPLIED
    )
    compile_mode: str = option(
        "default", "torch.compile mode, with --compile", choices=COMPILE_MODES, rule=Resume.APPLIED
    )
    channels_last: bool = option(
        False, "UNet weights and activations in channels-last (NHWC) memory format", rule=Resume.APPLIED
    )
    adamw_impl: str = option(
        "default",
        "AdamW kernel: default (torch's choice), foreach or fused",
        choices=ADAMW_IMPLS,
        rule=Resume.APPLIED,
    )
    attention_backend: str = option(
        "auto",
        "scaled_dot_product_attention kernel (auto: torch's choice per call)",
        choices=ATTENTION_BACKENDS,
        rule=Resume.APPLIED,
    )
    lora_rank: int = option(
        0,
        "0: full fine-tune; > 0: LoRA of this rank, reference = adapters disabled",
        minimum=0,
        rule=Resume.REFUSED,
    )
    lora_alpha: float | None = option(None, "LoRA α (default: the rank)", minimum=0.0, rule=Resume.REFUSED)
    sdxl_time_ids: str = option(
        "constant",
        "SDXL micro-conditioning: constant (R, R, 0, 0, R, R) as DiffusionDPO and SDXL inference; image: each "
        "image's stored size and crop (diffusers' SDXL script, MaPO)",
        choices=SDXL_TIME_IDS,
        rule=Resume.REFUSED,
    )
    # flow-matching families (SD3, FLUX): diffusers' train_dreambooth_lora_sd3.py / _flux.py and flow_grpo's
    # train_sd3_dpo.py sample the timestep from a logit-normal(0, 1) density over the scheduler's shifted sigmas
    timestep_sampling: str = option(
        "logit_normal",
        "SD3/FLUX: timestep density (diffusers' compute_density_for_timestep_sampling)",
        choices=TIMESTEP_SAMPLINGS,
        rule=Resume.REFUSED,
    )
    logit_mean: float = option(
        0.0, "SD3/FLUX: mean of the logit-normal timestep density", rule=Resume.REFUSED
    )
    logit_std: float = option(
        1.0, "SD3/FLUX: std of the logit-normal timestep density", positive=True, rule=Resume.REFUSED
    )
    mode_scale: float = option(1.29, "SD3/FLUX: scale of the 'mode' timestep density", rule=Resume.REFUSED)
    guidance: float = option(
        3.5,
        "FLUX with a guidance embedding (FLUX.1-dev): the guidance scale it trains at (diffusers' FLUX script)",
        minimum=0.0,
        rule=Resume.REFUSED,
    )
    # data stream
    num_workers: int = option(2, "DataLoader worker processes per rank", minimum=0, rule=Resume.TOPOLOGY)
    shards_in_flight: int = option(
        4, "shards each worker reads and mixes together", minimum=1, rule=Resume.REFUSED
    )
    data_only: bool = option(
        False,
        "benchmark the input stream: max_steps batches, no model (needs no --model)",
        rule=Resume.NOT_COMPARED,
    )
    fixed_batch: bool = option(
        False, "benchmark the step: train on the first batch, kept on the device", rule=Resume.NOT_COMPARED
    )
    # checkpoints, logging, evaluation
    checkpoint_every: int = option(
        500, "save a checkpoint every N steps and at the end (0: never)", minimum=0, rule=Resume.APPLIED
    )
    checkpoints_total_limit: int = option(
        3, "keep the newest N checkpoints (0: keep all)", minimum=0, rule=Resume.APPLIED
    )
    resume: str | None = option(
        None,
        "latest (the newest checkpoint in --output-dir, if any) or a checkpoint directory",
        rule=Resume.NOT_COMPARED,
    )
    overwrite_output_dir: bool = option(
        False,
        "replace the run --output-dir holds (its checkpoints, final/, logs) instead of refusing",
        rule=Resume.NOT_COMPARED,
    )
    max_skipped_fraction: float = option(
        0.1,
        "stop (exit 3) when more steps than this had a non-finite loss or gradient",
        minimum=0.0,
        maximum=1.0,
        rule=Resume.APPLIED,
    )
    log_every: int = option(
        10, "log metric means every N steps and at the end", minimum=1, rule=Resume.APPLIED
    )
    eval_every: int = option(
        0, "with --val-data: evaluate every N steps (0: only at the end)", minimum=0, rule=Resume.APPLIED
    )
    eval_max_pairs: int = option(512, "held-out pairs evaluated", minimum=1, rule=Resume.APPLIED)
    eval_draws: int = option(
        4, "(noise, timestep) draws averaged per held-out pair", minimum=1, rule=Resume.APPLIED
    )
    report_to: str = option(
        "tensorboard", "accelerate tracker for metrics (tensorboard, wandb, …), or none", rule=Resume.APPLIED
    )
    # sampling reads the policy and draws from its own generators: it never changes what the run trains
    sample_every: int = option(
        0,
        "write a fixed-seed image grid of --sample-prompts at step 0 and every N steps (0: never)",
        minimum=0,
        rule=Resume.APPLIED,
    )
    sample_prompts: str | None = option(
        None,
        "prompts for --sample-every: a text file (one a line), a JSON list, or FILE.parquet:COLUMN",
        rule=Resume.APPLIED,
    )

    def __post_init__(self) -> None:
        problems = field_problems(self, optional=("model",) if self.data_only else ())
        if self.adamw_impl != "default" and self.optimizer != "adamw":
            problems.append(f"--adamw-impl applies to --optimizer adamw only, not {self.optimizer}")
        if self.compile_mode != "default" and not self.compile:
            problems.append("--compile-mode needs --compile")
        if bool(self.sample_every) != bool(self.sample_prompts):
            problems.append("--sample-every and --sample-prompts go together")
        if self.sdpo_mu and self.loss not in SDPO_LOSSES:
            problems.append(f"--sdpo-mu wraps --loss {'/'.join(sorted(SDPO_LOSSES))} only, not {self.loss}")
        check(self, problems)


check_rules(EncodeConfig)
check_rules(TrainConfig)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
