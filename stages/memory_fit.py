"""Does one VAE call fit where the encoder actors run? Checked once Ray is up and before anything is written, so a
resolution or batch that cannot fit is refused at once instead of an actor that runs out of memory, is restarted and
runs out again.

The estimate is a lower bound, so nothing that fits is refused: at full resolution every ResNet block of the VAE
encoder holds its input (kept for the residual) and its GroupNorm output at once, two tensors of
[block_out_channels[0], R, R] per image in the compute dtype. The memory compared with: each CPU node's memory Ray
found available at its start (its `memory` plus `object_store_memory` resources); with GPUs, the smallest GPU's
total memory (asked from a task on a GPU).
"""

from __future__ import annotations

from pathlib import Path

from schemas import storage
from schemas.config import EncodeConfig
from schemas.errors import InputError
from schemas.sample import SIDES

GIB = 2**30
GPU_MEMORY = "GPU memory"


def bytes_per_image(model_dir: str, resolution: int, dtype: str, gpu: bool) -> int:
    """The lower bound of the VAE encoder's live activations for one image at `resolution`."""
    vae = storage.read_json(str(Path(model_dir) / "vae" / "config.json"))
    # what resolve_dtype picks: fp32 on CPU and for a VAE that asks force_upcast
    wide = dtype == "fp32" or (dtype == "auto" and (not gpu or vae.get("force_upcast", False)))
    return 2 * vae["block_out_channels"][0] * resolution**2 * (4 if wide else 2)


def images_per_call(config: EncodeConfig) -> int:
    """A VAE call's images when no image of the batch recurs: both sides of every pair, and their flips."""
    return config.encode_batch_size * len(SIDES) * (2 if config.flip else 1)


def _gpu_memory() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def actor_memory() -> tuple[int, str]:
    """(bytes, what they are) of the smallest place an encoder actor may land on the connected cluster."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(r.get("GPU") for r in nodes):
        return ray.get(ray.remote(num_gpus=1, num_cpus=0)(_gpu_memory).remote()), GPU_MEMORY
    cpu = [r for r in nodes if r.get("CPU")]
    return min(int(r.get("memory", 0) + r.get("object_store_memory", 0)) for r in cpu), "node memory"


def check_fit(config: EncodeConfig, model_dir: str, available: int, where: str, gpu: bool) -> None:
    """Refuse `--resolution` when one image cannot fit in `available` bytes, `--encode-batch-size` when a call's
    images cannot."""
    per_pixel = bytes_per_image(model_dir, 1, config.dtype, gpu)
    one = per_pixel * config.resolution**2
    have = f"the encoder actors have {available / GIB:.1f} GiB ({where})"
    if one > available:
        fitting = int((available / per_pixel) ** 0.5) // 8 * 8
        raise InputError(
            f"--resolution {config.resolution}: the VAE encoder needs at least {one / GIB:.1f} GiB per image at "
            f"this resolution and {have}; above about {fitting} none can fit"
        )
    per_call = images_per_call(config)
    if one * per_call > available:
        pairs = max(1, available // (one * per_call // config.encode_batch_size))
        raise InputError(
            f"--encode-batch-size {config.encode_batch_size}: a VAE call of {per_call} images needs at least "
            f"{one * per_call / GIB:.1f} GiB at --resolution {config.resolution} and {have}; above "
            f"--encode-batch-size {pairs} none can fit"
        )


def refuse_what_cannot_fit(config: EncodeConfig, model_dir: str) -> None:
    """check_fit against the connected cluster's encoder actors (Ray must be up)."""
    available, where = actor_memory()
    check_fit(config, model_dir, available, where, gpu=where == GPU_MEMORY)
