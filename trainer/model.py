"""Policy and reference UNets, the noise schedule, and per-pair denoising errors.

Full fine-tune: the reference is a second, frozen copy. LoRA: the reference is the same UNet with its adapters
disabled, so no second copy is held. Winner and loser of a pair share one timestep and one noise draw (as in the
official code), and both go through a single batched forward of 2B samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from schemas.config import SDXL_TIME_IDS
from schemas.errors import InputError
from schemas.manifest import Manifest
from schemas.sample import model_family
from schemas.seeds import seed_of
from trainer.data import check_checksums

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# keeps training-noise seeds apart from the data stream's (seed, slot, batch) seeds
_NOISE_DOMAIN = 0x4E4F495345


def has_lora(unet: torch.nn.Module) -> bool:
    """Whether peft adapters are injected (by `add_adapter` or `load_lora_adapter`): the one LoRA test."""
    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


@dataclass
class Models:
    # the UNet being trained, never wrapped (training goes through Trainer.prepared_policy, its prepared form)
    policy: UNet2DConditionModel
    # None: the policy with its LoRA adapters disabled
    reference: UNet2DConditionModel | None
    scheduler: DDPMScheduler
    # SDXL micro-conditioning, one of SDXL_TIME_IDS. "constant": (R, R, 0, 0, R, R) for every image, as
    # DiffusionDPO's train.py does and as SDXL pipelines condition at inference by default; "image": each image's
    # original size and crop, as diffusers' train_text_to_image_sdxl.py and MaPO do
    sdxl_time_ids: str = "constant"

    @cached_property
    def is_lora(self) -> bool:
        """Read once: the step asks at every micro-batch, and a UNet has thousands of modules to look through."""
        return has_lora(self.policy)


def load_models(
    model: str,
    *,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    need_reference: bool = True,
    gradient_checkpointing: bool = False,
    reference_dtype: torch.dtype = torch.float32,
    sdxl_time_ids: str = "constant",
) -> Models:
    """Load `model`'s unet/ and scheduler/, add LoRA when lora_rank > 0."""
    if sdxl_time_ids not in SDXL_TIME_IDS:
        raise ValueError(f"sdxl_time_ids must be one of {SDXL_TIME_IDS}, got {sdxl_time_ids!r}")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    policy = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    reference = None
    if lora_rank > 0:
        policy.requires_grad_(False)
        policy.add_adapter(
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha or lora_rank,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGETS,
            )
        )
    elif need_reference:
        reference = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=reference_dtype)
        reference.requires_grad_(False).eval()
    if gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    policy.train()
    return Models(policy, reference, scheduler, sdxl_time_ids)


def draw_noise(
    batch: dict, num_train_timesteps: int, *, seed: int, rank: int, micro_step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training noise and timesteps for one micro-batch: a pure function of (seed, rank, micro_step), so a resumed
    run draws exactly what the uninterrupted run drew and no RNG state has to be checkpointed."""
    g = torch.Generator().manual_seed(seed_of(_NOISE_DOMAIN, seed, rank, micro_step))
    latents = batch["w_latents"]
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=g)
    return noise, timesteps


def draw_eval_noise(
    batch: dict, num_train_timesteps: int, *, seed: int, draw: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation noise and timestep per pair, seeded by (seed, pair key, draw): independent of batch size and
    order, so every run scores the same pairs with the same draws."""
    shape = batch["w_latents"].shape[1:]
    noises, timesteps = [], []
    for key in batch["keys"]:
        g = torch.Generator().manual_seed(seed_of(_NOISE_DOMAIN, seed, key, draw))
        noises.append(torch.randn(shape, generator=g))
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
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


def sdxl_time_ids(batch: dict, mode: str) -> torch.Tensor:
    """[2B, 6] time ids for [winners; losers] from the stored per-image ids (original h, w, crop top, left, R, R)."""
    ids = torch.cat([batch["w_time_ids"], batch["l_time_ids"]])
    if mode == "image":
        return ids
    if mode == "constant":
        target = ids[:, 4:6]
        return torch.cat([target, torch.zeros_like(target), target], dim=1)
    raise ValueError(f"sdxl_time_ids must be one of {SDXL_TIME_IDS}, got {mode!r}")


def pair_forward(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    batch: dict,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    time_ids: str = "constant",
    winners_only: bool = False,
) -> PairOutput:
    """One forward over [winners; losers] with the pair's shared noise and timestep. `time_ids` picks the SDXL
    micro-conditioning (SDXL_TIME_IDS); SD1.5 batches ignore it. `winners_only`: the winners alone, half the
    compute, for a loss that never reads the losers (SFT, as DiffusionDPO's --sft feeds only the preferred image)."""
    sides = 1 if winners_only else 2
    latents = batch["w_latents"] if winners_only else torch.cat([batch["w_latents"], batch["l_latents"]])
    noise2 = torch.cat([noise] * sides).to(latents)
    t2 = torch.cat([timesteps] * sides).to(latents.device)
    noisy = scheduler.add_noise(latents, noise2, t2)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise2
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise2, t2)
    else:
        raise ValueError(
            f"scheduler prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)"
        )
    dtype = next(unet.parameters()).dtype
    prompt = batch["prompt_embeds"]
    added = None
    # SDXL: pooled text + time ids
    if "pooled_prompt_embeds" in batch:
        pooled = batch["pooled_prompt_embeds"]
        added = {
            "text_embeds": torch.cat([pooled] * sides).to(dtype),
            "time_ids": sdxl_time_ids(batch, time_ids)[: len(latents)].to(dtype),
        }
    pred = unet(
        noisy.to(dtype),
        t2,
        encoder_hidden_states=torch.cat([prompt] * sides).to(dtype),
        added_cond_kwargs=added,
    ).sample
    errors = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    if winners_only:
        return PairOutput(errors, None, pred, target)
    err_w, err_l = errors.chunk(2)
    return PairOutput(err_w, err_l, pred, target)


def pair_errors(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    batch: dict,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    time_ids: str = "constant",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e_w, e_l), each [B] fp32."""
    return pair_forward(unet, scheduler, batch, noise, timesteps, time_ids).errors


@contextmanager
def adapters_disabled(unet: UNet2DConditionModel) -> Iterator[None]:
    """The LoRA reference: the base UNet's output, restored to the policy afterwards even on error."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@torch.no_grad()
def reference_forward(
    models: Models, policy: UNet2DConditionModel, batch: dict, noise: torch.Tensor, timesteps: torch.Tensor
) -> PairOutput:
    """The frozen reference's pass; `policy` is the unwrapped policy (adapters toggled on it for LoRA).

    no_grad rather than inference_mode: these tensors enter a loss that saves tensors for backward.
    """
    if models.reference is not None:
        return pair_forward(models.reference, models.scheduler, batch, noise, timesteps, models.sdxl_time_ids)
    ctx = adapters_disabled(policy) if models.is_lora else nullcontext()
    with ctx:
        return pair_forward(policy, models.scheduler, batch, noise, timesteps, models.sdxl_time_ids)


def reference_errors(
    models: Models, policy: UNet2DConditionModel, batch: dict, noise: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen reference's (e_w, e_l)."""
    return reference_forward(models, policy, batch, noise, timesteps).errors


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def check_data_fits_model(data_dir: str, flag: str, model: str) -> Manifest:
    """The manifest of `data_dir`, refused (InputError naming the flag) when it is missing, has no checksums or was
    encoded for another model family or shape than `model`'s UNet: checked before any work, not as a shape error
    in step 1."""
    try:
        manifest = Manifest.load(data_dir)
        check_checksums(manifest, data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"{flag} {data_dir}: {e}") from None
    config = UNet2DConditionModel.load_config(model, subfolder="unet")
    family = model_family(model)
    problems = []
    if manifest.model_family != family:
        problems.append(f"it was encoded for {manifest.model_family}, --model {model} is {family}")
    elif manifest.latent_shape[0] != config["in_channels"]:
        problems.append(
            f"latents have {manifest.latent_shape[0]} channels, the UNet takes {config['in_channels']}"
        )
    elif manifest.text_embed_shape[-1] != config["cross_attention_dim"]:
        problems.append(
            f"text embeddings are {manifest.text_embed_shape[-1]}-dimensional, the UNet attends to "
            f"{config['cross_attention_dim']}"
        )
    if problems:
        raise InputError(f"{flag} {data_dir}: {'; '.join(problems)}; encode it with --model {model}")
    return manifest
