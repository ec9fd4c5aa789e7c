"""Held-out preference metrics: implicit accuracy and reward margin of a policy against its reference.

Every pair gets `draws` fixed (noise, timestep) draws seeded by (seed, pair key, draw), and the data are posterior
means with no flip or caption dropout, so repeated runs agree exactly and the reference scored against itself gives
exactly 0.5. The per-pair errors are averaged over the draws before the implicit reward is compared: a Monte Carlo
estimate of the expected denoising error, whose sign is far less noisy than that of a single timestep.
A pair whose errors are not finite (e.g. NaN latents) is left out of every mean and counted in `non_finite_pairs`.

CLI: python -m trainer.evaluate --data VAL_OUT --model MODEL [--unet DIR | --lora DIR] [--max-pairs N] [--seed S]
     [--batch-size B] [--beta BETA] [--draws K] [--json]
`--unet` takes a diffusers UNet folder (RUN/final/unet) or a training checkpoint (RUN/checkpoints/step_N, full or
LoRA). Evaluation data encoded at another resolution than the policy was trained on is refused (exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from schemas.config import SDXL_TIME_IDS
from schemas.errors import EXIT_INPUT, InputError
from schemas.failures import environment_exit
from schemas.families import folder_family
from schemas.loss_table import default_beta
from schemas.manifest import Manifest
from schemas.model_folder import check_weight_files, denoiser_parts, resolve_model
from schemas.storage import read_json
from trainer.checkpoint import EXPORT_RECORD, checkpoint_problem, load_trainable_weights
from trainer.data import iter_eval_batches
from trainer.denoisers import Denoising
from trainer.losses import dpo_logits, dpo_loss, implicit_accuracy, reward_margin
from trainer.model import (
    Models,
    check_data_fits_model,
    denoiser_class,
    draw_eval_noise,
    load_denoising,
    load_models,
    pair_errors,
    pair_forward,
    reference_errors,
    to_device,
)

# the file the trainer's LoRA export writes, and pipe.load_lora_weights reads
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
METRICS = (
    "implicit_accuracy",
    "reward_margin",
    "dpo_loss",
    "policy_err_w",
    "policy_err_l",
    "ref_err_w",
    "ref_err_l",
)


@torch.no_grad()
def evaluate(
    models: Models,
    policy: torch.nn.Module,
    data_dir: str | Path,
    *,
    batch_size: int = 16,
    max_pairs: int | None = None,
    seed: int = 0,
    beta: float = 5000.0,
    draws: int = 4,
    device: torch.device | str = "cpu",
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    groups: Mapping[str, str] | None = None,
) -> dict:
    """Means over the first `max_pairs` pairs of `data_dir`. `policy` is the unwrapped policy; when it is also the
    reference (no reference copy, no LoRA), its errors are reused, so the accuracy is exactly 0.5.

    `groups` (pair key → group name, e.g. what makes the loser worse) adds `accuracy_by_group` and
    `pairs_by_group`: which part of a preference was learned. Pairs it does not name count only in the means."""
    if draws < 1 or batch_size < 1 or (max_pairs is not None and max_pairs < 1):
        raise ValueError(
            f"draws, batch_size and max_pairs must be >= 1, got {draws}, {batch_size}, {max_pairs}"
        )
    policy_is_reference = models.reference is None and not models.is_lora
    was_training = policy.training
    policy.eval()
    sums = dict.fromkeys(METRICS, 0.0)
    group_hits: dict[str, list[float]] = {}
    n = non_finite = 0
    try:
        for batch in iter_eval_batches(data_dir, batch_size=batch_size, max_pairs=max_pairs):
            batch = to_device(batch, torch.device(device))
            errors = torch.zeros(4, len(batch["keys"]), device=device)
            for draw in range(draws):
                noise, timesteps = draw_eval_noise(batch, models.denoising, seed=seed, draw=draw)
                with autocast():
                    ref = reference_errors(models, policy, batch, noise, timesteps)
                    pol = (
                        ref
                        if policy_is_reference
                        else pair_errors(policy, models.denoising, batch, noise, timesteps)
                    )
                errors += torch.stack([*pol, *ref]).float() / draws
            finite = torch.isfinite(errors).all(dim=0)
            non_finite += int((~finite).sum())
            pol_w, pol_l, ref_w, ref_l = errors[:, finite]
            h = dpo_logits(pol_w, pol_l, ref_w, ref_l, beta)
            per_pair = {
                "implicit_accuracy": implicit_accuracy(h),
                "reward_margin": reward_margin(pol_w, pol_l, ref_w, ref_l),
                "dpo_loss": dpo_loss(
                    pol_w, pol_l, ref_w, ref_l, beta=beta, reduction="none", label=batch["label"][finite]
                ),
                "policy_err_w": pol_w,
                "policy_err_l": pol_l,
                "ref_err_w": ref_w,
                "ref_err_l": ref_l,
            }
            for k, v in per_pair.items():
                sums[k] += float(v.double().sum())
            kept = [key for key, ok in zip(batch["keys"], finite.tolist(), strict=True) if ok]
            for key, hit in zip(kept, per_pair["implicit_accuracy"].tolist(), strict=True):
                if groups and key in groups:
                    group_hits.setdefault(groups[key], []).append(hit)
            n += len(kept)
    finally:
        policy.train(was_training)
    # a mean over no pair would read as a result (accuracy 0.5); it is an error
    if n == 0:
        raise InputError(
            f"--data {data_dir}: no pair with finite errors to evaluate ({non_finite} non-finite); "
            "are the latents NaN?"
        )
    result: dict = {**{k: v / n for k, v in sums.items()}, "num_pairs": n, "non_finite_pairs": non_finite}
    if groups is not None:
        result["accuracy_by_group"] = {g: sum(h) / len(h) for g, h in sorted(group_hits.items())}
        result["pairs_by_group"] = {g: len(h) for g, h in sorted(group_hits.items())}
    return result


def _other_captions(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """For each pair, the index of the next pair in the batch (cyclically) with a different caption; -1 if none."""
    flat = prompt_embeds.flatten(1)
    n = len(flat)
    other = []
    for i in range(n):
        js = ((i + k) % n for k in range(1, n))
        other.append(next((j for j in js if not torch.equal(flat[i], flat[j])), -1))
    return torch.tensor(other, dtype=torch.long)


@torch.no_grad()
def caption_gap(
    unet: torch.nn.Module,
    denoising: Denoising,
    data_dir: str | Path,
    *,
    batch_size: int = 16,
    max_pairs: int | None = None,
    seed: int = 0,
    draws: int = 4,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """How much `unet` uses its text: mean denoising error of the preferred images under their own caption and
    under another pair's caption (same noise and timesteps). DPO can only learn a caption-dependent preference if
    the reference already reads the caption, so a right caption must give a clearly lower error."""
    was_training = unet.training
    unet.eval()
    own = wrong = 0.0
    n = 0
    try:
        for batch in iter_eval_batches(data_dir, batch_size=batch_size, max_pairs=max_pairs):
            batch = to_device(batch, torch.device(device))
            other = _other_captions(batch["prompt_embeds"])
            keep = other >= 0
            if not keep.any():
                continue
            # one pass over the preferred images twice: under their own captions, then under the other ones
            twice = {
                name: torch.cat([batch[name]] * 2)
                for name in ("w_latents", "w_time_ids", "l_time_ids")
                if name in batch
            }
            for name in ("prompt_embeds", "pooled_prompt_embeds"):
                if name in batch:
                    twice[name] = torch.cat(
                        [batch[name], batch[name][other.clamp(min=0).to(batch[name].device)]]
                    )
            for draw in range(draws):
                noise, timesteps = draw_eval_noise(batch, denoising, seed=seed, draw=draw)
                errors = pair_forward(
                    unet, denoising, twice, noise.repeat(2, 1, 1, 1), timesteps.repeat(2), winners_only=True
                ).err_w
                e_own, e_wrong = errors.chunk(2)
                own += float(e_own[keep].double().sum()) / draws
                wrong += float(e_wrong[keep].double().sum()) / draws
            n += int(keep.sum())
    finally:
        unet.train(was_training)
    if n == 0:
        raise ValueError(f"{data_dir}: no pair whose batch holds another caption")
    return {
        "err_own_caption": own / n,
        "err_other_caption": wrong / n,
        "relative_gap": (wrong - own) / wrong,
        "num_pairs": n,
    }


def strict_json(result: dict[str, float]) -> str:
    """One JSON line that any parser accepts: a non-finite number becomes null instead of a bare NaN."""
    return json.dumps(
        {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in result.items()},
        sort_keys=True,
        allow_nan=False,
    )


def load_policy(
    model: str, unet_dir: str | None, lora_dir: str | None, sdxl_time_ids: str = "constant"
) -> Models:
    """`Models` whose policy is `--unet` (a UNet folder or a training checkpoint), or the base `model` with `--lora`
    adapters, or the base; the reference is left None (a LoRA policy's is its adapters disabled). The folders were
    checked by check_policy_dirs."""
    if unet_dir and (Path(unet_dir) / "state.json").is_file():
        return _load_checkpoint_policy(model, Path(unet_dir), sdxl_time_ids)
    if unet_dir:
        denoising = load_denoising(model, sdxl_time_ids=sdxl_time_ids)
        return Models(denoiser_class(denoising.family).from_pretrained(unet_dir), None, denoising)
    base = load_models(model, need_reference=False, sdxl_time_ids=sdxl_time_ids)
    if lora_dir:
        base.policy.load_lora_adapter(str(lora_dir), prefix=base.family.denoiser, weight_name=LORA_WEIGHTS)
    return base


def load_for_eval(
    model: str, unet_dir: str | None, lora_dir: str | None, sdxl_time_ids: str = "constant"
) -> tuple[Models, torch.nn.Module]:
    """Reference = the base denoiser of `model` (a LoRA policy's: its adapters disabled); policy = `load_policy`'s."""
    models = load_policy(model, unet_dir, lora_dir, sdxl_time_ids)
    if unet_dir and not models.is_lora:
        reference = load_models(model, need_reference=False).policy.requires_grad_(False).eval()
        models = Models(models.policy, reference, models.denoising)
    return models, models.policy


def check_policy_dirs(unet_dir: str | None, lora_dir: str | None, family: str) -> None:
    """--unet / --lora hold what load_for_eval reads, whole: a checkpoint that passes its checks, a denoiser folder
    of the model's family with a config and intact weights, or the LoRA weights file."""
    if unet_dir and lora_dir:
        raise InputError("give --unet or --lora, not both")
    if unet_dir:
        folder = Path(unet_dir)
        if (folder / "state.json").is_file():
            if problem := checkpoint_problem(folder):
                raise InputError(f"--unet {unet_dir}: the checkpoint is damaged ({problem})")
            return
        if not (folder / "config.json").is_file():
            raise InputError(
                f"--unet {unet_dir}: neither a UNet folder (config.json) nor a training checkpoint (state.json)"
            )
        if folder_family(folder) != family:
            raise InputError(f"--unet {unet_dir}: a {folder_family(folder)} denoiser, --model is {family}")
        check_weight_files(folder, "--unet")
    if lora_dir:
        weights = Path(lora_dir) / LORA_WEIGHTS
        if not weights.is_file():
            raise InputError(f"--lora {lora_dir}: no {LORA_WEIGHTS} there")
        check_weight_files(Path(lora_dir), "--lora")


def _load_checkpoint_policy(model: str, path: Path, sdxl_time_ids: str) -> Models:
    """A checkpoint holds only the trainable weights: rebuild the policy the run trained (LoRA rank and alpha from
    its state.json) on the base `model`, then load them."""
    config = read_json(path / "state.json").get("config", {})
    models = load_models(
        model,
        lora_rank=int(config.get("lora_rank", 0)),
        lora_alpha=config.get("lora_alpha"),
        need_reference=False,
        sdxl_time_ids=sdxl_time_ids,
    )
    load_trainable_weights(path, models.policy)
    return models


def trained_resolution(policy_dir: str | None) -> int | None:
    """The resolution of the data a policy was trained on, when its run recorded it: a checkpoint's state.json,
    or run.json beside RUN/final/unet and RUN/final/lora."""
    if not policy_dir:
        return None
    for info in (Path(policy_dir) / "state.json", Path(policy_dir).parent / EXPORT_RECORD):
        if info.is_file():
            resolution = read_json(info).get("data", {}).get("resolution")
            return int(resolution) if resolution is not None else None
    return None


def check_trained_resolution(
    data_dir: str | Path, resolution: int, policy_flag: str, policy_dir: str
) -> None:
    """Exit 2 when the held-out data were encoded at another resolution than the policy's training data: the
    numbers would measure the resolution change, not the training. Checked for --unet and --lora alike."""
    trained = trained_resolution(policy_dir)
    if trained is not None and resolution != trained:
        raise InputError(
            f"--data {data_dir} was encoded at resolution {resolution}, the policy ({policy_flag} {policy_dir}) was "
            f"trained at {trained}; encode the evaluation data at {trained}"
        )


def warn_native_resolution(data_dir: str | Path, resolution: int, unet: torch.nn.Module) -> None:
    """With no record of the training data, compare with the denoiser's native size and warn."""
    # the VAE's 8x downsampling, as every SD VAE has (a transformer's sample_size counts latent pixels too)
    sample_size = getattr(unet.config, "sample_size", None)
    native = sample_size * 8 if sample_size else resolution
    if resolution != native:
        print(
            f"warning: --data {data_dir} was encoded at resolution {resolution}, the UNet's native size is "
            f"{native}; compare only numbers from data encoded at the resolution the policy was trained at",
            file=sys.stderr,
        )


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="encode output directory (manifest.json)")
    parser.add_argument("--model", required=True, help="base model folder: the reference (unet/, scheduler/)")
    parser.add_argument(
        "--unet",
        "--transformer",
        dest="unet",
        help="a trained denoiser folder (RUN/final/unet, RUN/final/transformer) or a training checkpoint "
        "(RUN/checkpoints/step_N)",
    )
    parser.add_argument("--lora", help="a LoRA folder saved by the trainer (e.g. RUN/final/lora)")
    parser.add_argument("--max-pairs", type=int, default=None, help="score the first N pairs (default: all)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the fixed (noise, timestep) draws (default: 0)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass (default: 16)")
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help="DPO β of the reported dpo_loss (default: the family's published dpo β, 5000 SD / 100 SD3, FLUX)",
    )
    parser.add_argument(
        "--draws", type=int, default=4, help="(noise, timestep) draws averaged per pair (default: 4)"
    )
    parser.add_argument(
        "--sdxl-time-ids",
        choices=SDXL_TIME_IDS,
        default="constant",
        help="SDXL micro-conditioning; use what the policy was trained with (default: constant)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    return parser


# flags that count something: 0 or less would measure nothing
POSITIVE_FLAGS = ("draws", "batch_size", "max_pairs")


def check_arguments(args: argparse.Namespace) -> Manifest:
    """Every flag and input before any model is loaded: counts, β, the model folder, the data against it
    (manifest, listed tars, family and shapes), the policy folders and the resolution they were trained at.
    Returns the data's manifest."""
    for name in POSITIVE_FLAGS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.beta is not None and not args.beta > 0:
        raise InputError(f"--beta must be > 0, got {args.beta}")
    family = resolve_model(args.model, denoiser_parts).family
    manifest = check_data_fits_model(args.data, "--data", args.model)
    if manifest.num_samples == 0:
        raise InputError(f"--data {args.data}: the manifest lists no pairs")
    check_policy_dirs(args.unet, args.lora, family.name)
    for flag, folder in (("--unet", args.unet), ("--lora", args.lora)):
        if folder:
            check_trained_resolution(args.data, manifest.resolution, flag, folder)
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as e:
        return environment_exit(e)


def run(args: argparse.Namespace) -> int:
    manifest = check_arguments(args)
    models, policy = load_for_eval(args.model, args.unet, args.lora, args.sdxl_time_ids)
    if trained_resolution(args.unet or args.lora) is None:
        warn_native_resolution(args.data, manifest.resolution, policy)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models.policy.to(device)
    if models.reference is not None:
        models.reference.to(device)
    result = evaluate(
        models,
        policy,
        args.data,
        batch_size=args.batch_size,
        max_pairs=args.max_pairs,
        seed=args.seed,
        beta=args.beta if args.beta is not None else default_beta("dpo", models.family.name),
        draws=args.draws,
        device=device,
    )
    if result["non_finite_pairs"]:
        print(
            f"warning: {result['non_finite_pairs']} pairs with non-finite errors were left out of the means",
            file=sys.stderr,
        )
    if args.json:
        print(strict_json(result))
    else:
        for k, v in result.items():
            print(f"{k:>18}: {v:.6g}" if isinstance(v, float) else f"{k:>18}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
