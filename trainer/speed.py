"""The step's speed options: torch.compile, channels-last memory format and the attention backend.

Each computes the same function as the eager default in another order of floating-point operations, so the loss
moves only by rounding (tests/test_speed.py bounds it); each is off by default until measured on a GPU
(BENCHMARKS_GPU.md). A whole-step CUDA graph (optimizer included) does not fit the step: it reads one device flag per
step to decide between update and skip, which a captured graph cannot branch on; `--compile-mode reduce-overhead`
captures the UNet passes instead (inductor's CUDA graph trees).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# --attention-backend → the scaled_dot_product_attention kernel diffusers' attention processors then run
ATTENTION_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


@contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Restrict scaled_dot_product_attention to one kernel for the enclosed work (auto: torch picks per call).
    The kernel is chosen when a graph is traced, so a compiled UNet keeps the one active while it compiled."""
    if name == "auto":
        yield
        return
    with sdpa_kernel([ATTENTION_KERNELS[name]]):
        yield


def to_channels_last(*modules: torch.nn.Module | None) -> None:
    """NHWC weights: cuDNN then runs the UNet's convolutions without layout transposes, and their outputs stay
    channels-last. Checkpoints and exports are written contiguous whatever the layout (trainer/checkpoint.py)."""
    for module in modules:
        if module is not None:
            module.to(memory_format=torch.channels_last)


def compile_in_place(mode: str, device: torch.device, *modules: torch.nn.Module | None) -> None:
    """`Module.compile`: the module stays the same object with the same parameter names, so accelerate, peft's
    adapter toggling (the LoRA reference), checkpoints and exports see no wrapper.

    On a CPU, torch 2.13's inductor fuses the UNet's backward wrongly: the tiny UNet's low-resolution blocks get
    zero gradients while the forward is right (tests/test_speed.py finds it); without kernel fusion the gradients
    are eager's. GPUs (Triton kernels) keep inductor's defaults; bench/gpu.py checks their gradients too."""
    if device.type == "cpu":
        torch._inductor.config.max_fusion_size = 1
    for module in modules:
        if module is not None:
            module.compile(mode=mode)
