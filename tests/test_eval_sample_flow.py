"""evaluation.sample on the flow-matching families through its real Ray Data job: the tiny SD3 and FLUX pipelines'
images are exactly what diffusers' own StableDiffusion3Pipeline / FluxPipeline make with the image's generator, with
the pipelines' own defaults as the dpo preset; --transformer samples a trained transformer; --preset sdpo, which no
flow paper defines, is refused."""

from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
import torch

from evaluation import sample
from evaluation.layout import read_images, read_settings
from evaluation.pipelines import png_bytes
from schemas.families import FAMILIES
from schemas.sample import model_family
from tests.test_eval_sample import sample_args

RESOLUTION = 32


def diffusers_png(model: Path, prompt: str, seed: int, guidance: float, **parts: object) -> bytes:
    """The oracle: the family's diffusers pipeline called as its docs show, with a generator of the image's seed."""
    pipe = getattr(diffusers, FAMILIES[model_family(model)].pipeline).from_pretrained(model, **parts)
    image = pipe(
        prompt,
        num_inference_steps=2,
        guidance_scale=guidance,
        height=RESOLUTION,
        width=RESOLUTION,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return png_bytes(image)


@pytest.mark.parametrize(("family", "guidance"), [("sd3", 7.0), ("flux", 3.5)])
def test_flow_images_are_the_diffusers_pipelines_own(
    family: str, guidance: float, request: pytest.FixtureRequest, ray_cluster, tmp_path: Path
) -> None:
    model = request.getfixturevalue(f"tiny_{family}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red cube\nblue ball\n")
    argv = sample_args(model, "base", prompts, tmp_path / "out", "--ray-address", ray_cluster.address)
    assert sample.main([*argv, "--num-workers", "1", "--batch-size", "1"]) == 0
    settings = read_settings(tmp_path / "out", "base")
    assert (settings["family"], settings["guidance"]) == (family, guidance)
    records = read_images(tmp_path / "out")
    assert len(records) == 4
    for r in records[:2]:
        assert (tmp_path / "out" / r.path).read_bytes() == diffusers_png(model, r.prompt, r.seed, guidance)

    assert sample.main([*argv, "--preset", "sdpo", "--name", "sdpo"]) == 2
    assert not (tmp_path / "out" / "sdpo").exists()


def test_a_trained_transformer_is_sampled(tiny_sd3: Path, ray_cluster, tmp_path: Path) -> None:
    """--transformer (a RUN/final/transformer folder) replaces the base's: its images are diffusers' with that
    transformer, and differ from the base's."""
    transformer = diffusers.SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    with torch.no_grad():
        for p in transformer.parameters():
            p.mul_(1.5)
    trained = tmp_path / "final" / "transformer"
    transformer.save_pretrained(trained)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("green cone\n")
    out = tmp_path / "out"
    argv = sample_args(tiny_sd3, "tuned", prompts, out, "--ray-address", ray_cluster.address)
    assert sample.main([*argv, "--transformer", str(trained), "--images-per-prompt", "1"]) == 0
    (record,) = read_images(out)
    image = (out / record.path).read_bytes()
    assert image == diffusers_png(tiny_sd3, record.prompt, record.seed, 7.0, transformer=transformer)
    assert image != diffusers_png(tiny_sd3, record.prompt, record.seed, 7.0)
