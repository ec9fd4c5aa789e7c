"""Policy and reference denoisers (the UNet or transformer of each family), the noise, and per-pair errors.

Full fine-tune: the reference is a second, frozen copy. LoRA: the reference is the same denoiser with its adapters
disabled, so no second copy is held. Winner and loser of a pair share one timestep and one noise draw (as in the
official code and flow_grpo's Flow-DPO), and both go through a single batched forward of 2B samples. What differs
between families (noising, target, conditioning) is trainer/denoisers.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import cached_property

import diffusers
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from schemas.config import SDXL_TIME_IDS
from schemas.errors import InputError
from schemas.families import FAMILIES, Family
from schemas.manifest import Manifest
from schemas.sample import model_family
from schemas.seeds import seed_of
from trainer.data import check_checksums, check_listed_files
from trainer.denoisers import FORWARDS, Denoising

# keeps training-noise seeds apart from the data stream's (seed, slot, batch) seeds
_NOISE_DOMAIN = 0x4E4F495345


def has_lora(module: torch.nn.Module) -> bool:
    """Whether peft adapters are injected (by `add_adapter` or `load_lora_adapter`): the one LoRA test."""
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


@dataclass
class Models:
    # the denoiser being trained, never wrapped (training goes through Trainer.prepared_policy, its prepared form)
    policy: torch.nn.Module
    # None: the policy with its LoRA adapters disabled
    reference: torch.nn.Module | None
    denoising: Denoising

    @property
    def family(self) -> Family:
        return self.denoising.family

    @property
    def scheduler(self) -> diffusers.SchedulerMixin:
        return self.denoising.scheduler

    @cached_property
    def is_lora(self) -> bool:
        """Read once: the step asks at every micro-batch, and a UNet has thousands of modules to look through."""
        return has_lora(self.policy)


def denoiser_class(family: Family) -> type:
    return getattr(diffusers, family.denoiser_class)


def load_denoising(model: str, **settings: object) -> Denoising:
    """`model`'s family and scheduler, with the run's settings for them (Denoising's fields)."""
    family = FAMILIES[model_family(model)]
    scheduler_class = diffusers.FlowMatchEulerDiscreteScheduler if family.is_flow else diffusers.DDPMScheduler
    scheduler = scheduler_class.from_pretrained(model, subfolder="scheduler")
    sdxl_time_ids = settings.get("sdxl_time_ids", "constant")
    if sdxl_time_ids not in SDXL_TIME_IDS:
        raise ValueError(f"sdxl_time_ids must be one of {SDXL_TIME_IDS}, got {sdxl_time_ids!r}")
    return replace(Denoising(family, scheduler), **settings)


def load_models(
    model: str,
    *,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    need_reference: bool = True,
    gradient_checkpointing: bool = False,
    reference_dtype: torch.dtype = torch.float32,
    **denoising: object,
) -> Models:
    """Load `model`'s denoiser (unet/ or transformer/) and scheduler, add LoRA when lora_rank > 0; `denoising`:
    the run's Denoising settings (SDXL time ids, the flow families' timestep density and guidance)."""
    setup = load_denoising(model, **denoising)
    family = setup.family
    cls = denoiser_class(family)
    policy = cls.from_pretrained(model, subfolder=family.denoiser)
    reference = None
    if lora_rank > 0:
        policy.requires_grad_(False)
        policy.add_adapter(
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha or lora_rank,
                init_lora_weights="gaussian",
                target_modules=list(family.lora_targets),
            )
        )
    elif need_reference:
        reference = cls.from_pretrained(model, subfolder=family.denoiser, torch_dtype=reference_dtype)
        reference.requires_grad_(False).eval()
    if gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    policy.train()
    return Models(policy, reference, setup)


def draw_noise(
    batch: dict, denoising: Denoising, *, seed: int, rank: int, micro_step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training noise and timestep indices for one micro-batch: a pure function of (seed, rank, micro_step), so a
    resumed run draws exactly what the uninterrupted run drew and no RNG state has to be checkpointed."""
    g = torch.Generator().manual_seed(seed_of(_NOISE_DOMAIN, seed, rank, micro_step))
    latents = batch["w_latents"]
    noise = torch.randn(latents.shape, generator=g)
    return noise, denoising.timestep_indices(latents.shape[0], g)


def draw_eval_noise(
    batch: dict, denoising: Denoising, *, seed: int, draw: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation noise and timestep index per pair, seeded by (seed, pair key, draw): independent of batch size
    and order, so every run scores the same pairs with the same draws."""
    shape = batch["w_latents"].shape[1:]
    noises, timesteps = [], []
    for key in batch["keys"]:
        g = torch.Generator().manual_seed(seed_of(_NOISE_DOMAIN, seed, key, draw))
        noises.append(torch.randn(shape, generator=g))
        timesteps.append(denoising.timestep_indices(1, g))
    return torch.stack(noises), torch.cat(timesteps)


@dataclass
class PairOutput:
    """One pass over a batch of pairs: the per-pair errors (fp32, [B]) and the tensors they came from ([2B, ...],
    winners first), which DSPO and the SDPO safeguard need beyond the errors. A winners-only pass (SFT) has no
    loser errors and [B, ...] tensors."""

    err_w: torch.Tensor
    err_l: torch.Tensor | None
    pred: torch.Tensor
    target: torch.Tensor

    @property
    def errors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.err_w, self.err_l


def pair_forward(
    denoiser: torch.nn.Module,
    denoising: Denoising,
    batch: dict,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    winners_only: bool = False,
) -> PairOutput:
    """One forward over [winners; losers] with the pair's shared noise and timestep index. `winners_only`: the
    winners alone, half the compute, for a loss that never reads the losers (SFT, as DiffusionDPO's --sft feeds
    only the preferred image). The error is the mean squared error of the prediction (noise, velocity) per image."""
    sides = 1 if winners_only else 2
    latents = batch["w_latents"] if winners_only else torch.cat([batch["w_latents"], batch["l_latents"]])
    noise2 = torch.cat([noise] * sides).to(latents)
    t2 = torch.cat([timesteps] * sides).to(latents.device)
    noisy, target = denoising.noised(latents, noise2, t2)
    pred = FORWARDS[denoising.family.name](denoiser, denoising, noisy, t2, batch, sides)
    errors = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
    if winners_only:
        return PairOutput(errors, None, pred, target)
    err_w, err_l = errors.chunk(2)
    return PairOutput(err_w, err_l, pred, target)


def pair_errors(
    denoiser: torch.nn.Module, denoising: Denoising, batch: dict, noise: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e_w, e_l), each [B] fp32."""
    return pair_forward(denoiser, denoising, batch, noise, timesteps).errors


@contextmanager
def adapters_disabled(denoiser: torch.nn.Module) -> Iterator[None]:
    """The LoRA reference: the base denoiser's output, restored to the policy afterwards even on error."""
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()


@torch.no_grad()
def reference_forward(
    models: Models, policy: torch.nn.Module, batch: dict, noise: torch.Tensor, timesteps: torch.Tensor
) -> PairOutput:
    """The frozen reference's pass; `policy` is the unwrapped policy (adapters toggled on it for LoRA).

    no_grad rather than inference_mode: these tensors enter a loss that saves tensors for backward.
    """
    if models.reference is not None:
        return pair_forward(models.reference, models.denoising, batch, noise, timesteps)
    ctx = adapters_disabled(policy) if models.is_lora else nullcontext()
    with ctx:
        return pair_forward(policy, models.denoising, batch, noise, timesteps)


def reference_errors(
    models: Models, policy: torch.nn.Module, batch: dict, noise: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen reference's (e_w, e_l)."""
    return reference_forward(models, policy, batch, noise, timesteps).errors


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def check_data_fits_model(data_dir: str, flag: str, model: str) -> Manifest:
    """The manifest of `data_dir`, refused (InputError naming the flag) when it is missing or unreadable, has no
    checksums, lists a tar that is not there, or was encoded for another model family or shape than `model`'s
    denoiser: checked before any work, not as a shape error in step 1."""
    try:
        manifest = Manifest.load(data_dir)
        check_checksums(manifest, data_dir)
        check_listed_files(manifest, data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"{flag} {data_dir}: {e}") from None
    family = FAMILIES[model_family(model)]
    problems = []
    if manifest.model_family != family.name:
        problems.append(f"it was encoded for {manifest.model_family}, --model {model} is {family.name}")
    else:
        problems = shape_problems(
            manifest, family, denoiser_class(family).load_config(model, subfolder=family.denoiser)
        )
    if problems:
        raise InputError(f"{flag} {data_dir}: {'; '.join(problems)}; encode it with --model {model}")
    return manifest


def shape_problems(manifest: Manifest, family: Family, config: dict) -> list[str]:
    """Where the encoded latents and text do not fit the denoiser's config (its input channels, the width it
    attends to, the pooled width it projects): one line per mismatch."""
    channels = manifest.latent_shape[0] * (4 if family.packed else 1)
    expected = {
        "latent channels": (channels, config["in_channels"]),
        "text width": (
            manifest.text_embed_shape[-1],
            config["joint_attention_dim" if family.is_flow else "cross_attention_dim"],
        ),
    }
    if family.is_flow:
        expected["pooled text width"] = (manifest.pooled_embed_dim, config["pooled_projection_dim"])
    return [
        f"{what}: the data has {have}, the {family.denoiser} takes {want}"
        for what, (have, want) in expected.items()
        if have != want
    ]
