"""VAE posterior moments for decoded pairs: a callable class that Ray runs as an actor and a benchmark runs bare.

No module-level Ray import, so it works where Ray is absent; no module-level diffusers import either: the encode
driver imports this module only to hand the class to Ray, and diffusers' import (seconds of CPU) belongs in the
actor. Moments are stored *unscaled* in fp16 (`latent_dist.mean`, `latent_dist.logvar`), so the trainer can draw a
fresh sample every step as the official code does with `latent_dist.sample()`. Flipped variants are encoded from
flipped pixels rather than by flipping latents: a conv VAE is not flip-equivariant (`flip_equivariance_gap`
measures by how much; bench/run.py reports it).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

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


# Per actor: Pick-a-Pic's recurring images sit a few rows apart (a session keeps its preferred image), not chunks
REUSE_CACHE_BYTES = 256 << 20
IMAGE_KEYS = tuple(f"{side}_image" for side in SIDES)  # decode_pairs' image_key per side, when given


class LatentEncoder:
    """`__call__({"w", "l": uint8 [N, R, R, 3], "w_image", "l_image": keys, ...}) → {..., w_mean, l_mean, ... : fp16
    [N, C, h, w]}`.

    Each image goes through the VAE once per view (plain, flipped): a key that recurs in the batch, or, with
    `reuse_across_batches`, in an earlier batch of this actor (a bounded LRU), gets the stored moments, so every
    pair holding that image stores the same bytes for it. Across batches only when the actor is the pool's one:
    batches are then seen in input order, so what is reused is a function of the input alone; with several actors
    it would depend on which actor got which batch, and so would the batches' composition and the rounding.
    Without the keys every slot is its own image. Columns other than the images pass through, so ids and metadata
    reach the writer untouched. `counter` (a stages.progress.RowCounter actor) is told the images encoded.
    """

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str | None = None,
        flip: bool = True,
        latent_mode: str = "moments",
        num_threads: int | None = None,
        channels_last: bool = False,
        compile: bool = False,
        reuse_across_batches: bool = True,
        counter: Any = None,
    ) -> None:
        from diffusers import AutoencoderKL

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = default_device(device)
        force_upcast = bool(AutoencoderKL.load_config(model, subfolder="vae").get("force_upcast", False))
        self.dtype = resolve_dtype(dtype, self.device, force_upcast)
        self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=self.dtype)
        self.vae.to(self.device).eval().requires_grad_(False)
        # speed only: the same encoder with NHWC weights or compiled (inductor), equal up to rounding
        self.channels_last = channels_last
        if channels_last:
            self.vae.to(memory_format=torch.channels_last)
        if compile:
            self.vae.encoder.compile()
        self.flip = flip
        self.names = latent_tensor_names(latent_mode, flip)
        self.parts = ("mean", "logvar") if latent_mode == "moments" else ("mean",)
        self.views = [False, True] if flip else [False]
        self.reuse_across_batches = reuse_across_batches
        self.counter = counter
        self.cache: OrderedDict[str, dict[tuple[str, bool], np.ndarray]] = OrderedDict()
        self.cache_bytes = 0
        self.vae_images = 0  # images through the VAE, each view counted

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [N, H, W, 3] → (mean, logvar) fp32 [N, C, h, w], normalising to [-1, 1] on the device."""
        x = images.to(self.device).permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dist = self.vae.encode(x).latent_dist
        return dist.mean.float(), dist.logvar.float()

    def encode_images(self, images: list[np.ndarray]) -> list[dict[tuple[str, bool], np.ndarray]]:
        """One VAE call over [images; flipped images]: per image its fp16 moments by (part, flipped)."""
        pixels = torch.from_numpy(np.stack(images))
        if self.flip:
            pixels = torch.cat([pixels, pixels.flip(2)])  # flip along width
        mean, logvar = self.moments(pixels)
        self.vae_images += len(pixels)
        if self.counter is not None:
            self.counter.add_vae_images.remote(len(pixels))
        n = len(images)
        computed = {"mean": mean.half().cpu().numpy(), "logvar": logvar.half().cpu().numpy()}
        return [
            {
                (part, flipped): computed[part][i + n * flipped]
                for flipped in self.views
                for part in self.parts
            }
            for i in range(n)
        ]

    def _remember(self, key: str, moments: dict[tuple[str, bool], np.ndarray]) -> None:
        self.cache[key] = moments
        self.cache_bytes += sum(a.nbytes for a in moments.values())
        while self.cache_bytes > REUSE_CACHE_BYTES and len(self.cache) > 1:
            _, evicted = self.cache.popitem(last=False)
            self.cache_bytes -= sum(a.nbytes for a in evicted.values())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["w"])
        if n == 0:  # every row of the block was dropped while decoding
            return self._empty(batch)
        slots = [(side, i) for side in SIDES for i in range(n)]  # winners first: [w; l], as one VAE call
        keyed = all(k in batch for k in IMAGE_KEYS)
        # without keys a slot's name is batch-local: it must never meet the cache
        cache = self.cache if keyed and self.reuse_across_batches else {}
        keys = [str(batch[f"{side}_image"][i]) if keyed else f"{side}{i}" for side, i in slots]
        new: dict[str, tuple[str, int]] = {}
        for key, slot in zip(keys, slots, strict=True):
            if key not in cache and key not in new:
                new[key] = slot
        known = {}
        if new:
            images = [np.ascontiguousarray(batch[side][i]) for side, i in new.values()]
            known = dict(zip(new, self.encode_images(images), strict=True))
        for key in dict.fromkeys(keys):
            if key in cache:
                self.cache.move_to_end(key)
                known[key] = self.cache[key]
            elif cache is self.cache:
                self._remember(key, known[key])
        out = {k: v for k, v in batch.items() if k not in (*SIDES, *IMAGE_KEYS)}
        for flipped in self.views:
            for s, side in enumerate(SIDES):
                side_keys = keys[s * n : (s + 1) * n]
                for part in self.parts:
                    out[tensor_name(side, part, flipped)] = np.stack(
                        [known[k][(part, flipped)] for k in side_keys]
                    )
        return out

    def _empty(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The output columns with no rows, shaped by one VAE call over no images."""
        mean, _ = self.moments(torch.from_numpy(np.ascontiguousarray(batch["w"])))
        out = {k: v for k, v in batch.items() if k not in (*SIDES, *IMAGE_KEYS)}
        return {**out, **{name: mean.half().cpu().numpy() for name in self.names}}


def flip_equivariance_gap(encoder: LatentEncoder, images: torch.Tensor) -> float:
    """Relative L2 error of flip(encode(x)) against encode(flip(x)) for uint8 [N, H, W, 3]: what flipping cached
    latents instead of encoding flipped pixels would cost."""
    mean, _ = encoder.moments(images)
    mean_of_flipped, _ = encoder.moments(images.flip(2))
    return float((mean.flip(-1) - mean_of_flipped).norm() / mean_of_flipped.norm())
