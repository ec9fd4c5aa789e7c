"""trainer.train --sample-every/--sample-prompts: fixed-seed grids at step 0 and every N steps, in DIR/samples and
tensorboard, that leave the training bit-identical to a run without them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from evaluation.pipelines import generate, image_seed, load_pipeline
from evaluation.sample import PRESETS
from tests.test_train import _fresh_accelerate_state, final_weights, train_argv  # noqa: F401 (autouse fixture)
from trainer import train
from trainer.run_dir import TRACKER_DIR
from trainer.samples import PRESET, grid

PROMPTS = ["a red cube", "a blue ball on a table", "green triangle, studio lighting"]


def test_sampling_leaves_the_run_bit_identical(tiny_sd15: Path, latent_sd15: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ("--max-steps", "4", "--caption-dropout", "0.3", "--report-to", "tensorboard")
    sampling = ("--sample-every", "2", "--sample-prompts", str(prompts))
    assert train.main(train_argv(latent_sd15, tiny_sd15, tmp_path / "plain", *common)) == 0
    assert train.main(train_argv(latent_sd15, tiny_sd15, tmp_path / "sampled", *common, *sampling)) == 0
    plain, sampled = final_weights(tmp_path / "plain"), final_weights(tmp_path / "sampled")
    assert plain.keys() == sampled.keys() and all(torch.equal(plain[k], sampled[k]) for k in plain)

    samples = tmp_path / "sampled" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step_0.png", "step_2.png", "step_4.png"]
    assert not (tmp_path / "plain" / "samples").exists()
    # step 0 is the reference: the base model's own pipeline, each prompt's image from its seed
    pipe = load_pipeline(tiny_sd15)
    seeds = [image_seed(0, i, 0) for i in range(len(PROMPTS))]
    reference = grid(
        generate(pipe, PROMPTS, seeds, steps=PRESETS[PRESET].steps["sd15"], guidance=7.5, resolution=64)
    )
    step_0 = Image.open(samples / "step_0.png")
    assert step_0.size == (2 * 64, 2 * 64)
    assert np.array_equal(np.asarray(step_0), np.asarray(reference))
    assert not np.array_equal(np.asarray(step_0), np.asarray(Image.open(samples / "step_4.png")))

    events = EventAccumulator(str(tmp_path / "sampled" / TRACKER_DIR), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [0, 2, 4]


def test_resume_skips_written_grids(tiny_sd15: Path, latent_sd15: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    args = ("--sample-every", "2", "--sample-prompts", str(prompts), "--checkpoint-every", "2")
    assert train.main(train_argv(latent_sd15, tiny_sd15, tmp_path / "run", "--max-steps", "2", *args)) == 0
    first = (tmp_path / "run" / "samples" / "step_2.png").stat().st_mtime_ns
    more = ("--max-steps", "4", "--resume", "latest")
    assert train.main(train_argv(latent_sd15, tiny_sd15, tmp_path / "run", *more, *args)) == 0
    assert (tmp_path / "run" / "samples" / "step_2.png").stat().st_mtime_ns == first
    assert (tmp_path / "run" / "samples" / "step_4.png").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--sample-every", "2"), "error: --sample-every and --sample-prompts go together"),
        (("--sample-every", "2", "--sample-prompts", "missing.txt"), "error: --sample-prompts missing.txt"),
    ],
)
def test_sampling_flags_are_checked_before_any_work(
    tiny_sd15: Path,
    latent_sd15: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    assert train.main(train_argv(latent_sd15, tiny_sd15, tmp_path / "run", "--max-steps", "1", *extra)) == 2
    assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "run").exists()
