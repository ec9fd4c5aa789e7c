"""Each family's noising and its denoiser's forward: what differs between SD1.5/SDXL UNets and SD3/FLUX transformers.

A pair's noise and timestep are drawn as an index into the scheduler's 1,000 training timesteps, for every family:
DDPM (SD1.5, SDXL) draws it uniformly and noises with the scheduler's alphas, the target being the noise or the
velocity as the scheduler is configured; rectified flow (SD3, FLUX) draws it with the family's timestep density
(logit-normal by default) over the scheduler's sigmas, which carry the family's shift, and noises
x_t = (1 − σ)·x0 + σ·ε with the velocity target v = ε − x0, as diffusers' train_dreambooth_lora_sd3.py /
train_dreambooth_lora_flux.py and flow_grpo's train_sd3_dpo.py do. Adding a family is its schemas/families.py
entry plus its forward in FORWARDS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from schemas.config import SDXL_TIME_IDS
from schemas.families import Family


@dataclass(frozen=True)
class Denoising:
    """How a family's latents are noised and its denoiser conditioned, with the run's settings for it."""

    family: Family
    scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler
    # SDXL micro-conditioning, one of SDXL_TIME_IDS. "constant": (R, R, 0, 0, R, R) for every image, as
    # DiffusionDPO's train.py does and as SDXL pipelines condition at inference by default; "image": each image's
    # original size and crop, as diffusers' train_text_to_image_sdxl.py and MaPO do
    sdxl_time_ids: str = "constant"
    # flow families: diffusers' compute_density_for_timestep_sampling weighting scheme and its parameters
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # FLUX with a guidance embedding (FLUX.1-dev): the distilled guidance scale it is trained at
    guidance: float = 3.5

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def timestep_indices(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """`n` indices into the scheduler's training timesteps: uniform for DDPM, the family's density for flow."""
        if not self.family.is_flow:
            return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        u = compute_density_for_timestep_sampling(
            self.timestep_sampling,
            n,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            generator=generator,
        )
        return (u * self.num_train_timesteps).long().clamp_(max=self.num_train_timesteps - 1)

    def noised(
        self, latents: torch.Tensor, noise: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, the denoiser's target) at the given timestep indices."""
        if self.family.is_flow:
            sigmas = self.scheduler.sigmas.to(latents.device)[indices].to(latents.dtype)
            sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1)))
            return (1.0 - sigmas) * latents + sigmas * noise, noise - latents
        noisy = self.scheduler.add_noise(latents, noise, indices)
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noisy, noise
        if prediction_type == "v_prediction":
            return noisy, self.scheduler.get_velocity(latents, noise, indices)
        raise ValueError(
            f"scheduler prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)"
        )


def sdxl_time_ids(batch: dict, mode: str) -> torch.Tensor:
    """[2B, 6] time ids for [winners; losers] from the stored per-image ids (original h, w, crop top, left, R, R)."""
    ids = torch.cat([batch["w_time_ids"], batch["l_time_ids"]])
    if mode == "image":
        return ids
    if mode == "constant":
        target = ids[:, 4:6]
        return torch.cat([target, torch.zeros_like(target), target], dim=1)
    raise ValueError(f"sdxl_time_ids must be one of {SDXL_TIME_IDS}, got {mode!r}")


def _repeated(batch: dict, key: str, sides: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-pair batch tensor for [winners; losers] (or the winners alone when sides is 1)."""
    return torch.cat([batch[key]] * sides).to(dtype)


def unet_forward(
    unet: torch.nn.Module,
    denoising: Denoising,
    noisy: torch.Tensor,
    indices: torch.Tensor,
    batch: dict,
    sides: int,
) -> torch.Tensor:
    dtype = next(unet.parameters()).dtype
    added = None
    if denoising.family.time_ids:
        added = {
            "text_embeds": _repeated(batch, "pooled_prompt_embeds", sides, dtype),
            "time_ids": sdxl_time_ids(batch, denoising.sdxl_time_ids)[: len(noisy)].to(dtype),
        }
    return unet(
        noisy.to(dtype),
        indices,
        encoder_hidden_states=_repeated(batch, "prompt_embeds", sides, dtype),
        added_cond_kwargs=added,
    ).sample


def _flow_timesteps(denoising: Denoising, indices: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep input: the scheduler's timestep (σ · 1000) at each index."""
    return denoising.scheduler.timesteps.to(indices.device)[indices]


def sd3_forward(
    transformer: torch.nn.Module,
    denoising: Denoising,
    noisy: torch.Tensor,
    indices: torch.Tensor,
    batch: dict,
    sides: int,
) -> torch.Tensor:
    dtype = next(transformer.parameters()).dtype
    return transformer(
        hidden_states=noisy.to(dtype),
        timestep=_flow_timesteps(denoising, indices),
        encoder_hidden_states=_repeated(batch, "prompt_embeds", sides, dtype),
        pooled_projections=_repeated(batch, "pooled_prompt_embeds", sides, dtype),
        return_dict=False,
    )[0]


def flux_forward(
    transformer: torch.nn.Module,
    denoising: Denoising,
    noisy: torch.Tensor,
    indices: torch.Tensor,
    batch: dict,
    sides: int,
) -> torch.Tensor:
    """FLUX sees its latents as 2×2 patch tokens with (0, row, column) image ids and zero text ids, its timestep
    divided by 1000, and the guidance scale when it embeds one (FluxPipeline's own static methods pack them)."""
    from diffusers import FluxPipeline

    dtype = next(transformer.parameters()).dtype
    n, channels, height, width = noisy.shape
    packed = FluxPipeline._pack_latents(noisy.to(dtype), n, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(n, height // 2, width // 2, noisy.device, dtype)
    prompt = _repeated(batch, "prompt_embeds", sides, dtype)
    text_ids = torch.zeros(prompt.shape[1], 3, device=noisy.device, dtype=dtype)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((n,), denoising.guidance, device=noisy.device, dtype=torch.float32)
    prediction = transformer(
        hidden_states=packed,
        timestep=_flow_timesteps(denoising, indices) / 1000,
        guidance=guidance,
        pooled_projections=_repeated(batch, "pooled_prompt_embeds", sides, dtype),
        encoder_hidden_states=prompt,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    # _unpack_latents takes the pixel size and the VAE's factor; a factor of 1 makes the latent size the pixel size
    return FluxPipeline._unpack_latents(prediction, height, width, 1)


Forward = Callable[[torch.nn.Module, Denoising, torch.Tensor, torch.Tensor, dict, int], torch.Tensor]
FORWARDS: dict[str, Forward] = {
    "sd15": unet_forward,
    "sdxl": unet_forward,
    "sd3": sd3_forward,
    "flux": flux_forward,
}
