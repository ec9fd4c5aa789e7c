"""VAE posterior moments for decoded pairs: a callable class that Ray runs as an actor and a benchmark runs bare.

No module-level Ray import, so it works where Ray is absent; no module-level diffusers import either: the encode
driver imports this module only to hand the class to Ray, and diffusers' import (seconds of CPU) belongs in the
actor. Moments are stored *unscaled* in fp16 (`latent_dist.mean`, `latent_dist.logvar`), so the trainer can draw a
fresh sample every step as the official code does with `latent_dist.sample()`. Flipped variants are encoded from
flipped pixels rather than by flipping latents: a conv VAE is not flip-equivariant (`flip_equivariance_gap`
measures by how much; bench/run.py reports it).
"""

from __future__ import annotations

import numpy as np
import torch

from schemas.config import ENCODE_DTYPES
from schemas.sample import SIDES, TORCH_DTYPES, latent_tensor_names, tensor_name


def resolve_dtype(dtype: str, device: torch.device, force_upcast: bool) -> torch.dtype:
    """auto: fp16 on GPU unless the model asks for fp32 (force_upcast, e.g. the SDXL VAE), fp32 on CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" and not force_upcast else torch.float32
    if dtype not in ENCODE_DTYPES:
        raise ValueError(f"dtype must be one of {ENCODE_DTYPES}, got {dtype!r}")
    return TORCH_DTYPES[dtype]


def default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class LatentEncoder:
    """`__call__({"w", "l": uint8 [N, R, R, 3], ...}) → {..., w_mean, l_mean, ... : fp16 [N, C, h, w]}`.

    Columns other than the images pass through, so ids and metadata reach the writer untouched.
    """

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str | None = None,
        flip: bool = True,
        latent_mode: str = "moments",
        num_threads: int | None = None,
    ) -> None:
        from diffusers import AutoencoderKL

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = default_device(device)
        force_upcast = bool(AutoencoderKL.load_config(model, subfolder="vae").get("force_upcast", False))
        self.dtype = resolve_dtype(dtype, self.device, force_upcast)
        self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=self.dtype)
        self.vae.to(self.device).eval().requires_grad_(False)
        self.flip = flip
        self.names = latent_tensor_names(latent_mode, flip)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [N, H, W, 3] → (mean, logvar) fp32 [N, C, h, w], normalising to [-1, 1] on the device."""
        x = images.to(self.device).permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0
        dist = self.vae.encode(x).latent_dist
        return dist.mean.float(), dist.logvar.float()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["w"])
        # [w; l]
        pixels = torch.cat([torch.from_numpy(np.ascontiguousarray(batch[s])) for s in SIDES])
        if self.flip:
            # [w; l; w_flip; l_flip], flip along width
            pixels = torch.cat([pixels, pixels.flip(2)])
        mean, logvar = self.moments(pixels)
        out = {k: v for k, v in batch.items() if k not in SIDES}
        views = [False, True] if self.flip else [False]
        for v, flipped in enumerate(views):
            for s, side in enumerate(SIDES):
                rows = slice((v * 2 + s) * n, (v * 2 + s + 1) * n)
                for part, tensor in (("mean", mean), ("logvar", logvar)):
                    name = tensor_name(side, part, flipped)
                    if name in self.names:
                        out[name] = tensor[rows].half().cpu().numpy()
        return out


def flip_equivariance_gap(encoder: LatentEncoder, images: torch.Tensor) -> float:
    """Relative L2 error of flip(encode(x)) against encode(flip(x)) for uint8 [N, H, W, 3]: what flipping cached
    latents instead of encoding flipped pixels would cost."""
    mean, _ = encoder.moments(images)
    mean_of_flipped, _ = encoder.moments(images.flip(2))
    return float((mean.flip(-1) - mean_of_flipped).norm() / mean_of_flipped.norm())
