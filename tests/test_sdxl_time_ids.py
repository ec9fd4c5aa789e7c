"""SDXL micro-conditioning: `--sdxl-time-ids constant` (DiffusionDPO's recipe, the default) or `image` (stored ids).

DiffusionDPO train.py (SalesforceAIResearch/DiffusionDPO@8d3ee5c), SDXL-base:
    add_time_ids = torch.tensor([args.resolution, args.resolution, 0, 0, args.resolution, args.resolution], ...)
What reaches the UNet is read off its own time-id projection (a forward hook on `add_time_proj`), not re-derived.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from schemas.config import TrainConfig
from schemas.errors import InputError
from trainer.data import iter_eval_batches
from trainer.model import draw_eval_noise, load_models, pair_errors


def errors_and_time_ids(model: Path, data: Path, mode: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    models = load_models(str(model), need_reference=False, sdxl_time_ids=mode)
    batch = next(iter_eval_batches(data, batch_size=4))
    noise, timesteps = draw_eval_noise(batch, models.denoising, seed=0)
    seen: list[torch.Tensor] = []
    hook = models.policy.add_time_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].clone())
    )
    try:
        with torch.no_grad():
            e_w, e_l = pair_errors(models.policy, models.denoising, batch, noise, timesteps)
    finally:
        hook.remove()
    return torch.stack([e_w, e_l]), seen[0].reshape(-1, 6), batch


def test_constant_is_the_official_recipe_and_image_the_stored_ids(tiny_sdxl: Path, latent_sdxl: Path) -> None:
    err_const, ids_const, batch = errors_and_time_ids(tiny_sdxl, latent_sdxl, "constant")
    err_image, ids_image, _ = errors_and_time_ids(tiny_sdxl, latent_sdxl, "image")
    r = float(batch["w_time_ids"][0, 4])
    assert ids_const.tolist() == [[r, r, 0.0, 0.0, r, r]] * 8  # 4 winners then 4 losers
    stored = torch.cat([batch["w_time_ids"], batch["l_time_ids"]])
    assert torch.equal(ids_image, stored)
    assert (
        stored[:, :4] != torch.tensor([r, r, 0, 0])
    ).any()  # the fixture's sizes and crops are not constant
    assert not torch.allclose(err_const, err_image)  # the conditioning reaches the prediction


def test_default_is_constant() -> None:
    assert TrainConfig(data="d", model="m").sdxl_time_ids == "constant"


def test_unknown_mode_is_an_error_naming_the_flag(tiny_sdxl: Path) -> None:
    with pytest.raises(InputError, match="--sdxl-time-ids"):
        TrainConfig(data="d", model="m", sdxl_time_ids="original")
    with pytest.raises(ValueError, match="sdxl_time_ids"):
        load_models(str(tiny_sdxl), need_reference=False, sdxl_time_ids="original")
