"""The step's speed options compute the same step: loss and gradients equal eager's up to rounding, fused AdamW
makes the same update, and a compiled channels-last run resumed from a checkpoint ends bit-identical to one that
was not interrupted (and its channels-last UNet exports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from schemas.config import ATTENTION_BACKENDS, TrainConfig
from schemas.errors import InputError
from trainer.speed import ATTENTION_KERNELS, attention_backend
from trainer.step import micro_batch_loss, with_noise
from trainer.train import build_trainer, training_batches

ROOT = Path(__file__).resolve().parents[1]
# fp32 on a CPU: another summation order moves an error by ~1e-7 relative and the gradient by ~1e-5
ERROR_RTOL = 1e-5
GRAD_RTOL = 1e-3


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch._dynamo.reset()


def _config(model: Path, data: Path, **options: object) -> TrainConfig:
    return TrainConfig(
        data=str(data),
        model=str(model),
        batch_size=2,
        num_workers=0,
        learning_rate=1e-3,
        scale_lr=False,
        lr_warmup_steps=0,
        report_to="none",
        **options,
    )


def _errors_and_gradient(model: Path, data: Path, **options: object) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch of the DPO step (reference pass, policy pass, loss, backward) on the stream's first batch:
    the mean policy and reference errors of winners and losers, and the policy's gradient."""
    cfg = _config(model, data, **options)
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    with attention_backend(cfg.attention_backend):
        trainer = build_trainer(cfg, accelerator)
        batch = with_noise(next(training_batches(cfg, accelerator, 0)), trainer, 0)
        loss, stats = micro_batch_loss(trainer, batch)
        accelerator.backward(loss)
    errors = torch.stack([stats[k] for k in ("policy_err_w", "policy_err_l", "ref_err_w", "ref_err_l")])
    grads = [p.grad.flatten() for p in trainer.models.policy.parameters() if p.requires_grad]
    return errors.detach(), torch.cat(grads)


# One compiled configuration only: inductor compiles the tiny UNet's training and inference graphs in about two
# minutes on two cores, and the resume test below then finds them in inductor's cache.
@pytest.mark.parametrize(
    "options",
    [
        {"channels_last": True},
        {"compile": True, "channels_last": True},
        {"attention_backend": "math"},
        {"attention_backend": "flash"},
        {"lora_rank": 4, "channels_last": True},
    ],
    ids=["channels-last", "compile-channels-last", "sdpa-math", "sdpa-flash", "lora-channels-last"],
)
def test_option_leaves_errors_and_gradient_unchanged(
    tiny_sd15: Path, latent_sd15: Path, options: dict
) -> None:
    """The errors, not the loss: at β 5000 a policy that equals its reference sits at h = 0, where rounding of
    1e-7 between the two passes moves the loss by 1e-4, while what the step computes is unchanged."""
    eager_options = {"lora_rank": options["lora_rank"]} if "lora_rank" in options else {}
    eager_errors, eager_grad = _errors_and_gradient(tiny_sd15, latent_sd15, **eager_options)
    errors, grad = _errors_and_gradient(tiny_sd15, latent_sd15, **options)
    assert torch.allclose(errors, eager_errors, rtol=ERROR_RTOL, atol=0)
    assert float((grad - eager_grad).norm() / eager_grad.norm()) < GRAD_RTOL
    # the comparison is not vacuous: the step trains something
    assert float(eager_grad.norm()) > 0


def test_fused_adamw_makes_the_default_update(tiny_sd15: Path, latent_sd15: Path) -> None:
    updated = {}
    for impl in ("default", "fused"):
        cfg = _config(tiny_sd15, latent_sd15, adamw_impl=impl)
        trainer = build_trainer(cfg, Accelerator(cpu=True, step_scheduler_with_optimizer=False))
        torch.manual_seed(1)
        for p in trainer.models.policy.parameters():
            p.grad = torch.randn_like(p)
        trainer.optimizer.step()
        assert trainer.optimizer.optimizer.defaults["fused"] is (impl == "fused" or None)
        updated[impl] = torch.cat([p.detach().flatten() for p in trainer.models.policy.parameters()])
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert torch.allclose(updated["fused"], updated["default"], rtol=0, atol=1e-7)


def test_every_attention_backend_flag_names_a_kernel() -> None:
    assert set(ATTENTION_BACKENDS) == {"auto", *ATTENTION_KERNELS}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"adamw_impl": "fused", "optimizer": "adafactor"}, "--adamw-impl applies to --optimizer adamw"),
        ({"compile_mode": "max-autotune"}, "--compile-mode needs --compile"),
        ({"attention_backend": "xformers"}, "--attention-backend must be one of"),
    ],
)
def test_speed_flags_are_checked(options: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        TrainConfig(data="d", model="m", **options)


def _train(model: Path, data: Path, out: Path, max_steps: int, *extra: str) -> dict:
    args = [
        *("--data", str(data), "--model", str(model), "--output-dir", str(out)),
        *("--batch-size", "2", "--num-workers", "0", "--learning-rate", "1e-3", "--no-scale-lr"),
        *("--lr-warmup-steps", "0", "--report-to", "none", "--checkpoint-every", "2"),
        *("--max-steps", str(max_steps), "--compile", "--channels-last", "--adamw-impl", "fused", *extra),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run(
        [sys.executable, "-m", "trainer.train", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_resumed_compiled_channels_last_run_ends_bit_identical(
    tiny_sd15: Path, latent_sd15: Path, tmp_path: Path
) -> None:
    _train(tiny_sd15, latent_sd15, tmp_path / "whole", 4)
    _train(tiny_sd15, latent_sd15, tmp_path / "split", 2)
    resumed = _train(tiny_sd15, latent_sd15, tmp_path / "split", 4, "--resume", "latest")
    assert resumed["steps_this_run"] == 2
    whole = load_file(tmp_path / "whole" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    split = load_file(tmp_path / "split" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    # the export is a plain diffusers UNet that differs from the base: training happened and was saved
    base = load_file(tiny_sd15 / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(whole[k], base[k]) for k in base)
