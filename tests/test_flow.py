"""The flow-matching families (SD3, FLUX.1) end to end on tiny real models, against oracles others wrote: the
stored text is the diffusers pipeline's own `encode_prompt`, the latents are shifted and scaled as diffusers'
training scripts do, the trainer's forward is the pipeline's own denoiser call, the loss is flow_grpo's Flow-DPO
transcribed, and the exported transformer and LoRA load in the family's pipeline and generate. Folders of other
widths, depths and vocabularies than `make models`' go through the same tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from safetensors.torch import load_file

from schemas.families import FAMILIES
from schemas.manifest import Manifest
from schemas.sample import caption_key, decode_tensors, model_family, read_tar
from tests.fixtures.zoo_encodes import CAPTIONS, FLOW_SEQUENCE_LENGTH, R
from trainer.data import LatentPairStream, iter_eval_batches
from trainer.denoisers import FORWARDS, Denoising
from trainer.losses import dpo_loss
from trainer.model import draw_noise, load_models, pair_forward, reference_forward

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red cube, studio lighting"


def pipeline_of(model: Path, **parts: object) -> diffusers.DiffusionPipeline:
    return getattr(diffusers, FAMILIES[model_family(model)].pipeline).from_pretrained(model, **parts)


def encode_prompt(pipe: diffusers.DiffusionPipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds) as the family's pipeline returns them, no guidance batch."""
    if isinstance(pipe, FluxPipeline):
        prompt, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=FLOW_SEQUENCE_LENGTH)
        return prompt, pooled
    prompt, _, pooled, _ = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=FLOW_SEQUENCE_LENGTH
    )
    return prompt, pooled


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_flux"])
def test_stored_text_is_the_pipelines_encode_prompt(
    name: str, zoo_encode, request: pytest.FixtureRequest
) -> None:
    """One embedding per unique caption (the empty one for caption dropout among them), each what the pipeline's
    encode_prompt returns for that one prompt, T5's padded positions included, within fp16 rounding."""
    model = request.getfixturevalue(name)
    out = zoo_encode(model)
    manifest = Manifest.load(out)
    sd3 = FAMILIES[manifest.model_family].name == "sd3"
    pipe = pipeline_of(model, transformer=None, vae=None)
    width = pipe.text_encoder_3.config.d_model if sd3 else pipe.text_encoder_2.config.d_model
    length = 77 + FLOW_SEQUENCE_LENGTH if sd3 else FLOW_SEQUENCE_LENGTH
    assert (
        manifest.text_embed_shape == [length, width] and manifest.max_sequence_length == FLOW_SEQUENCE_LENGTH
    )
    stored = {}
    for shard in manifest.text_shards:
        for sample in read_tar(out / shard.path, read=("safetensors",)):
            stored[sample.key] = decode_tensors(sample.data["safetensors"], [], sample.where)
    assert set(stored) == {caption_key(c) for c in [*CAPTIONS, ""]}
    for caption in [*CAPTIONS, ""]:
        expected = dict(
            zip(("prompt_embeds", "pooled_prompt_embeds"), encode_prompt(pipe, [caption]), strict=True)
        )
        for name_, tensor in expected.items():
            got = stored[caption_key(caption)][name_].float()
            assert got.shape == tensor.shape[1:]
            assert torch.allclose(got, tensor[0].float(), rtol=2**-10, atol=1e-6), (caption, name_)
    # T5 pads to max_sequence_length and attends to the padding: those positions carry caption-dependent values
    t5 = slice(77, None) if sd3 else slice(None)
    short = stored[caption_key(CAPTIONS[0])]["prompt_embeds"][t5][-1]
    other = stored[caption_key(CAPTIONS[1])]["prompt_embeds"][t5][-1]
    assert not torch.equal(short, other)


def test_latents_are_shifted_and_scaled_as_the_diffusers_scripts_do(zoo_encode, tiny_flux: Path) -> None:
    """diffusers examples/dreambooth/train_dreambooth_lora_flux.py (and _sd3.py):
        model_input = (model_input - vae_config_shift_factor) * vae_config_scaling_factor
    applied by the stream to the stored posterior mean (no sampling, no flip)."""
    out = zoo_encode(tiny_flux)
    manifest = Manifest.load(out)
    vae_config = diffusers.AutoencoderKL.load_config(tiny_flux, subfolder="vae")
    stream = LatentPairStream(
        out, batch_size=2, seed=0, random_flip=False, sample_latents=False, caption_dropout=0
    )
    batch = next(iter(stream))
    stored = {}
    for shard in manifest.shards:
        for sample in read_tar(out / shard.path, read=("safetensors",)):
            stored[sample.key] = decode_tensors(sample.data["safetensors"], [], sample.where)
    for i, key in enumerate(batch["keys"]):
        model_input = stored[key]["w_mean"].float()
        model_input = (model_input - vae_config["shift_factor"]) * vae_config["scaling_factor"]
        assert torch.allclose(batch["w_latents"][i], model_input, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_flux", "other_sd3", "other_flux"])
def test_the_forward_is_the_pipelines_own_denoiser_call(name: str, request: pytest.FixtureRequest) -> None:
    """The pipeline's first Euler step from known latents is x1 = x0 + (σ1 − σ0)·v, so its velocity v is read
    back from its own latents; the trainer's forward (FLUX: packing, image and text ids, guidance, timestep / 1000)
    on the same latents, text and timestep must give it."""
    model = request.getfixturevalue(name)
    family = FAMILIES[model_family(model)]
    pipe = pipeline_of(model)
    x0 = torch.randn(1, 16, R // 8, R // 8, generator=torch.Generator().manual_seed(0))
    start = FluxPipeline._pack_latents(x0, 1, 16, R // 8, R // 8) if family.packed else x0
    steps = []

    def record(_pipe: object, _step: int, _t: object, kwargs: dict) -> dict:
        steps.append(kwargs["latents"].clone())
        return kwargs

    guidance = {"guidance_scale": 3.5} if family.packed else {"guidance_scale": 1.0}  # SD3: 1 means no CFG
    pipe(
        PROMPT,
        num_inference_steps=2,
        height=R,
        width=R,
        latents=start.clone(),
        output_type="latent",
        max_sequence_length=FLOW_SEQUENCE_LENGTH,
        callback_on_step_end=record,
        **guidance,
    )
    sigmas = pipe.scheduler.sigmas
    v_pipeline = (steps[0] - start) / (sigmas[1] - sigmas[0])
    prompt, pooled = encode_prompt(pipe, [PROMPT])
    denoising = Denoising(family, pipe.scheduler, guidance=3.5)
    batch = {"prompt_embeds": prompt, "pooled_prompt_embeds": pooled}
    with torch.no_grad():
        v = FORWARDS[family.name](pipe.transformer, denoising, x0, torch.tensor([0]), batch, 1)
    if family.packed:
        v = FluxPipeline._pack_latents(v, 1, 16, R // 8, R // 8)
    assert float((v - v_pipeline).norm() / v_pipeline.norm()) < 1e-4


def test_flow_dpo_is_flow_grpos_loss(tiny_sd3: Path, zoo_encode) -> None:
    """yifan123/flow_grpo scripts/train_sd3_dpo.py (ac4c86e) lines 884-937, transcribed below: the same loss and
    errors from the trainer's draw (shared noise and timestep of winner and loser), noising and forward."""
    batch = next(iter_eval_batches(zoo_encode(tiny_sd3), batch_size=3))
    models = load_models(str(tiny_sd3))
    with torch.no_grad():
        for p in models.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    denoising = models.denoising
    noise, indices = draw_noise(batch, denoising, seed=0, rank=0, micro_step=0)
    pol = pair_forward(models.policy, denoising, batch, noise, indices)
    ref = reference_forward(models, models.policy, batch, noise, indices)
    beta = 100.0
    ours = dpo_loss(*pol.errors, *ref.errors, beta=beta)

    # the trainer's u for this micro-step, drawn as flow_grpo does (diffusers' compute_density_for_timestep_sampling)
    from schemas.seeds import seed_of
    from trainer import model as model_module

    g = torch.Generator().manual_seed(seed_of(model_module._NOISE_DOMAIN, 0, 0, 0))
    g_noise = torch.randn(batch["w_latents"].shape, generator=g)
    noise_scheduler = denoising.scheduler
    transformer, transformer_ref = models.policy, models.reference
    embeds = torch.cat([batch["prompt_embeds"]] * 2)
    pooled_embeds = torch.cat([batch["pooled_prompt_embeds"]] * 2)
    with torch.no_grad():
        # --- flow_grpo, scripts/train_sd3_dpo.py ---
        model_input = torch.cat([batch["w_latents"], batch["l_latents"]])
        bsz = model_input.shape[0] // 2
        noise = torch.cat([g_noise[:bsz], g_noise[:bsz]], dim=0)
        u = compute_density_for_timestep_sampling(
            weighting_scheme="logit_normal",
            batch_size=bsz,
            logit_mean=0,
            logit_std=1,
            mode_scale=1.29,
            generator=g,
        )
        indices = (u * noise_scheduler.config.num_train_timesteps).long()
        timesteps = noise_scheduler.timesteps[indices].to(device=model_input.device)
        timesteps = torch.cat([timesteps, timesteps], dim=0)
        # get_sigmas(noise_scheduler, timesteps, accelerator, n_dim=model_input.ndim, dtype=model_input.dtype)
        schedule_timesteps = noise_scheduler.timesteps
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigmas = noise_scheduler.sigmas[step_indices].flatten().to(model_input.dtype)
        while len(sigmas.shape) < model_input.ndim:
            sigmas = sigmas.unsqueeze(-1)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        model_pred = transformer(
            hidden_states=noisy_model_input,
            timestep=timesteps,
            encoder_hidden_states=embeds,
            pooled_projections=pooled_embeds,
            return_dict=False,
        )[0]
        model_pred_ref = transformer_ref(
            hidden_states=noisy_model_input,
            timestep=timesteps,
            encoder_hidden_states=embeds,
            pooled_projections=pooled_embeds,
            return_dict=False,
        )[0]
        target = noise - model_input
        theta_mse = ((model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
        ref_mse = ((model_pred_ref.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
        model_w_err = theta_mse[:bsz]
        model_l_err = theta_mse[bsz:]
        ref_w_err = ref_mse[:bsz]
        ref_l_err = ref_mse[bsz:]
        w_diff = model_w_err - ref_w_err
        l_diff = model_l_err - ref_l_err
        w_l_diff = w_diff - l_diff
        inside_term = -0.5 * beta * w_l_diff
        loss = -F.logsigmoid(inside_term)
        loss = torch.mean(loss)
        # --- end of transcription ---
    assert torch.allclose(pol.err_w, model_w_err, rtol=1e-6) and torch.allclose(
        pol.err_l, model_l_err, rtol=1e-6
    )
    assert torch.allclose(ref.err_w, ref_w_err, rtol=1e-6) and torch.allclose(ref.err_l, ref_l_err, rtol=1e-6)
    assert float(ours) == pytest.approx(float(loss), rel=1e-6) and float(loss) != pytest.approx(
        0.6931, abs=1e-4
    )


def _train(model: Path, data: Path, out: Path, max_steps: int, *extra: str) -> subprocess.CompletedProcess:
    args = [
        *("--data", str(data), "--model", str(model), "--output-dir", str(out)),
        *("--batch-size", "2", "--num-workers", "0", "--learning-rate", "1e-3", "--no-scale-lr"),
        *(
            "--lr-warmup-steps",
            "0",
            "--report-to",
            "none",
            "--checkpoint-every",
            "2",
            "--max-steps",
            str(max_steps),
        ),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "trainer.train", *args], cwd=REPO, capture_output=True, text=True, env=env
    )


def _generate(pipe: diffusers.DiffusionPipeline) -> torch.Tensor:
    image = pipe(
        PROMPT,
        num_inference_steps=2,
        height=R,
        width=R,
        output_type="pt",
        max_sequence_length=FLOW_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert torch.isfinite(image).all()
    return image


def test_flux_trains_resumes_exactly_evaluates_and_exports_a_loadable_transformer(
    tiny_flux: Path, zoo_encode, tmp_path: Path
) -> None:
    data = zoo_encode(tiny_flux)
    for run, steps, extra in (("whole", 4, ()), ("split", 2, ()), ("split", 4, ("--resume", "latest"))):
        r = _train(tiny_flux, data, tmp_path / run, steps, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    weights = "final/transformer/diffusion_pytorch_model.safetensors"
    whole, split = load_file(tmp_path / "whole" / weights), load_file(tmp_path / "split" / weights)
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)
    trained = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "whole" / "final" / "transformer")
    assert not torch.equal(
        _generate(pipeline_of(tiny_flux, transformer=trained)), _generate(pipeline_of(tiny_flux))
    )
    r = subprocess.run(
        [
            *(sys.executable, "-m", "trainer.evaluate", "--data", str(data), "--model", str(tiny_flux)),
            *("--transformer", str(tmp_path / "whole" / "final" / "transformer"), "--draws", "2", "--json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["num_pairs"] == Manifest.load(data).num_samples
    assert result["policy_err_w"] != result["ref_err_w"]


def test_sd3_lora_of_another_size_exports_what_load_lora_weights_reads(
    other_sd3: Path, zoo_encode, tmp_path: Path
) -> None:
    """A LoRA run on an SD3 folder of other widths and vocabulary: final/lora loads through the pipeline's own
    load_lora_weights and gives the images of the merged final/transformer, not the base model's."""
    data = zoo_encode(other_sd3)
    r = _train(other_sd3, data, tmp_path / "lora", 2, "--lora-rank", "4", "--learning-rate", "3e-2")
    assert r.returncode == 0, r.stderr[-3000:]
    final = tmp_path / "lora" / "final"
    with_lora = pipeline_of(other_sd3)
    with_lora.load_lora_weights(final / "lora")
    merged = diffusers.SD3Transformer2DModel.from_pretrained(final / "transformer")
    image = _generate(with_lora)
    assert torch.allclose(image, _generate(pipeline_of(other_sd3, transformer=merged)), atol=1e-4)
    assert not torch.allclose(image, _generate(pipeline_of(other_sd3)), atol=1e-3)


def test_flow_losses_and_flags_are_checked_before_anything_is_written(
    tiny_flux: Path, tiny_sd15: Path, zoo_encode, tmp_path: Path
) -> None:
    """A loss without a flow form on FLUX data, a flow-only flag on SD1.5 data: exit 2 naming why, no traceback,
    the output directory untouched."""
    cases = (
        (tiny_flux, ("--loss", "mapo"), r"--loss mapo does not apply to flux models: .*DDPM"),
        (tiny_sd15, ("--guidance", "1.0"), r"only the flow-matching families \(SD3, FLUX\) take --guidance"),
    )
    for i, (model, flags, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        r = _train(model, zoo_encode(model), out, 1, *flags)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert re.search(message, r.stderr), r.stderr
        assert not out.exists()
