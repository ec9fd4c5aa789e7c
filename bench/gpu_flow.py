"""The flow-matching architectures as published (SD3.5-medium, FLUX.1-dev) at random init, timed through the
trainer's own step: Flow-DPO pairs/s, MFU and peak memory for LoRA and for a full fine-tune with Adafactor and
gradient checkpointing, at 1024² (or the statement that it does not fit one GPU: the row's error).

The transformer is built on the device and handed to `build_trainer` instead of being written to disk and loaded:
FLUX.1-dev's 12 B parameters are 24 GB in bf16, minutes of a device lease to save and read twice. The data is a
contract-conformant encode output with the real shapes (embedded/latent_dataset.py): 16×128×128 latents, SD3's
333 × 4096 text (77 CLIP + 256 T5 tokens) with 2,048 pooled, FLUX's 512 × 4096 with 768 pooled.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
from peft import LoraConfig

from bench.gpu_harness import DATASHEET_TFLOPS, Bench
from bench.gpu_models import FLUX_DEV, SD35_MEDIUM
from bench.gpu_step import measure_step, release_device_memory
from embedded.latent_dataset import write_latent_dataset
from schemas.config import TrainConfig
from schemas.families import FAMILIES
from trainer.denoisers import Denoising
from trainer.model import Models

# family, architecture, text tokens, pooled width, the scheduler config as published
ARCHITECTURES = {
    "sd3.5-medium": ("sd3", SD35_MEDIUM, 77 + 256, 2048, {"shift": 3.0}),
    "flux.1-dev": (
        "flux",
        FLUX_DEV,
        512,
        768,
        {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
    ),
}
RESOLUTION = 1024
LORA_RANK = 64


def flow_models(name: str, device: torch.device, *, lora: bool, tiny: bool) -> Models:
    """The architecture at random init on the device: fp32 policy (LoRA: frozen, adapters of rank 64 on the family's
    targets; the reference is the adapters disabled), else a bf16 frozen copy as the reference."""
    family_name, config, _, _, scheduler = ARCHITECTURES[name]
    family = FAMILIES[family_name]
    cls = getattr(diffusers, family.denoiser_class)
    with torch.device(device):
        policy = cls(**(tiny_config(family_name) if tiny else config))
    reference = None
    if lora:
        policy.requires_grad_(False)
        targets = list(family.lora_targets)
        policy.add_adapter(
            LoraConfig(
                r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian", target_modules=targets
            )
        )
    else:
        reference = copy.deepcopy(policy).to(torch.bfloat16).requires_grad_(False).eval()
        policy.enable_gradient_checkpointing()
    policy.train()
    denoising = Denoising(
        family, diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **scheduler)
    )
    return Models(policy, reference, denoising)


def tiny_config(family: str) -> dict:
    """The tiny models' transformer config (embedded/tiny_flow.py), for a CPU smoke run of this harness."""
    from embedded.tiny_flow import build_tiny_flow_model

    folder = build_tiny_flow_model(family, Path("/tmp") / f"bench-gpu-flow-{family}")
    config = getattr(diffusers, FAMILIES[family].denoiser_class).load_config(folder, subfolder="transformer")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def flow_data(name: str, work: Path, tiny: bool) -> Path:
    family, config, length, pooled, _ = ARCHITECTURES[name]
    out = work / f"latents-{name}{'-tiny' if tiny else ''}"
    if not (out / "manifest.json").exists():
        if tiny:
            write_latent_dataset(out, family=family, latent_shape=(16, 8, 8), num_pairs=16, shard_size=8)
        else:
            write_latent_dataset(
                out,
                family=family,
                num_pairs=16,
                shard_size=8,
                latent_shape=(16, RESOLUTION // 8, RESOLUTION // 8),
                text_dim=config["joint_attention_dim"],
                pooled_dim=pooled,
                text_length=length,
                num_captions=4,
                text_shard_size=8,
                resolution=RESOLUTION,
            )
    return out


def flow_row(bench: Bench, name: str, *, lora: bool) -> None:
    """One architecture × (LoRA | full with Adafactor and gradient checkpointing) through the trainer's step."""
    tiny, device = bench.tiny, bench.device
    label = f"LoRA rank {LORA_RANK}, AdamW" if lora else "full, Adafactor, gradient checkpointing"
    options: dict = (
        {"lora_rank": LORA_RANK} if lora else {"optimizer": "adafactor", "gradient_checkpointing": True}
    )
    cfg = TrainConfig(
        data=str(flow_data(name, bench.work, tiny)),
        # the transformer is handed over built: no folder is read
        model="(random init)",
        output_dir=str(bench.work / "runs" / name),
        batch_size=1,
        mixed_precision="bf16" if device.type == "cuda" else "no",
        report_to="none",
        lr_warmup_steps=0,
        checkpoint_every=0,
        num_workers=1,
        **options,
    )
    try:
        m = measure_step(
            cfg,
            steps=2 if tiny else 4,
            warmup=2,
            count_flops=True,
            models=flow_models(name, device, lora=lora, tiny=tiny),
        )
    except Exception as e:  # out of memory is a result: the configuration does not fit one GPU
        release_device_memory()
        bench.report.add(
            "flow",
            [name, label, 1, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:140]}", "", "", "", ""],
        )
        return
    tflop = m.flops_per_pair / 1e12 if m.flops_per_pair else 0.0
    achieved = m.pairs_per_s * tflop
    peak = f"{m.peak_gib:.1f}" if m.peak_gib is not None else "n/a"
    mfu = [f"{achieved / bench.peak:.1%}", f"{achieved / DATASHEET_TFLOPS:.1%}"]
    bench.report.add("flow", [name, label, 1, f"{m.pairs_per_s:.3f}", f"{tflop:,.0f}", *mfu, peak])


def flow_rows(bench: Bench) -> list[tuple[str, Callable[[], None]]]:
    return [
        (f"{name} {kind}", lambda n=name, lora=(kind == "lora"): flow_row(bench, n, lora=lora))
        for name in ARCHITECTURES
        for kind in ("lora", "full")
    ]
