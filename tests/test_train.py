"""The trainer in-process on the tiny models and real latent tars: training, export, resume, skipping, data-only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from embedded.latent_dataset import write_latent_dataset
from schemas.atomic import process_umask, read_json
from schemas.manifest import Manifest
from tests.fixtures.damage import poison_pairs
from trainer import demo, train
from trainer.evaluate import evaluate, load_for_eval
from trainer.model import draw_noise, load_models, pair_errors, reference_errors

FAST = [
    "--batch-size",
    "4",
    "--num-workers",
    "1",
    "--learning-rate",
    "1e-3",
    "--no-scale-lr",
    "--lr-warmup-steps",
    "0",
    "--report-to",
    "none",
    "--log-every",
    "1",
]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run must start from a clean slate."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_train(data: Path, model: Path, out: Path, *args: str) -> None:
    assert (
        train.main(["--data", str(data), "--model", str(model), "--output-dir", str(out), *FAST, *args]) == 0
    )


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trains_and_exports(family: str, lora: bool, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model, data = request.getfixturevalue(f"tiny_{family}"), request.getfixturevalue(f"latent_{family}")
    run_train(
        data,
        model,
        tmp_path,
        "--max-steps",
        "2",
        "--checkpoint-every",
        "1",
        *(["--lora-rank", "4"] if lora else []),
    )
    base = UNet2DConditionModel.from_pretrained(model, subfolder="unet").state_dict()
    trained = UNet2DConditionModel.from_pretrained(tmp_path / "final" / "unet").state_dict()
    assert base.keys() == trained.keys()
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "state.json",
    ]
    saved = load_file(ckpt / "model.safetensors")
    assert all("lora" in k for k in saved) if lora else len(saved) == len(base)
    written = [p for d in ("checkpoints", "final") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert {p.stat().st_mode & 0o777 for p in written} == {0o666 & ~process_umask()}  # weights too, not 0600
    if lora:  # the adapter loads into a diffusers pipeline, and fused it equals the exported merged UNet
        pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        pipe = pipeline.from_pretrained(model)
        pipe.load_lora_weights(tmp_path / "final" / "lora")
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        for k, v in pipe.unet.state_dict().items():
            torch.testing.assert_close(v, trained[k], rtol=1e-5, atol=1e-6)
        as_lora = evaluate(
            *load_for_eval(str(model), None, str(tmp_path / "final" / "lora")), data, max_pairs=8
        )
        merged = evaluate(
            *load_for_eval(str(model), str(tmp_path / "final" / "unet"), None), data, max_pairs=8
        )
        assert as_lora["policy_err_w"] == pytest.approx(merged["policy_err_w"], rel=1e-4)
        assert as_lora["policy_err_w"] != as_lora["ref_err_w"]


def test_lora_reference_is_the_base_unet(tiny_sd15: Path, latent_sd15: Path) -> None:
    from trainer.data import iter_eval_batches

    batch = next(iter_eval_batches(latent_sd15, batch_size=3))
    noise, t = draw_noise(batch, 1000, seed=0, rank=0, micro_step=0)
    lora = load_models(str(tiny_sd15), lora_rank=4)
    with torch.no_grad():
        for name, p in lora.policy.named_parameters():
            if "lora_B" in name:
                p.normal_()
    base = load_models(str(tiny_sd15), need_reference=False).policy
    ref_w, ref_l = reference_errors(lora, lora.policy, batch, noise, t)
    base_w, base_l = pair_errors(base, lora.scheduler, batch, noise, t)
    assert torch.equal(ref_w, base_w) and torch.equal(ref_l, base_l)
    pol_w, _ = pair_errors(lora.policy, lora.scheduler, batch, noise, t)
    assert not torch.equal(pol_w, base_w)  # adapters are active again after the reference pass


def test_resume_latest_is_bit_identical(tiny_sd15: Path, latent_sd15: Path, tmp_path: Path) -> None:
    common = (
        "--batch-size",
        "2",
        "--gradient-accumulation-steps",
        "2",
        "--checkpoint-every",
        "2",
        "--caption-dropout",
        "0.3",
        "--lr-warmup-steps",
        "2",
    )
    run_train(latent_sd15, tiny_sd15, tmp_path / "straight", "--max-steps", "4", *common)
    run_train(latent_sd15, tiny_sd15, tmp_path / "split", "--max-steps", "2", *common)
    run_train(latent_sd15, tiny_sd15, tmp_path / "split", "--max-steps", "4", "--resume", "latest", *common)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = read_json(tmp_path / "split" / "checkpoints" / "step_00000004" / "state.json")
    assert state["micro_step"] == 8 and state["global_step"] == 4 and state["skipped_steps"] == 0
    assert state["lr_scheduler"]["last_epoch"] == 4
    with pytest.raises(SystemExit, match="batch_size: checkpoint 2, now 4"):
        run_train(
            latent_sd15,
            tiny_sd15,
            tmp_path / "split",
            "--max-steps",
            "6",
            "--resume",
            "latest",
            "--checkpoint-every",
            "2",
        )


def test_non_finite_steps_are_skipped_and_counted(tiny_sd15: Path, tmp_path: Path) -> None:
    data = write_latent_dataset(tmp_path / "data", family="sd15", num_pairs=16, shard_size=4)
    poison_pairs(data, 1, float("inf"))
    run_train(
        data,
        tiny_sd15,
        tmp_path / "run",
        "--max-steps",
        "8",
        "--checkpoint-every",
        "8",
        "--shards-in-flight",
        "1",
        "--report-to",
        "tensorboard",
    )
    state = read_json(tmp_path / "run" / "checkpoints" / "step_00000008" / "state.json")
    assert 0 < state["skipped_steps"] < 8  # shard 1 comes up in some steps, the others still train
    weights = final_weights(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in weights.values())
    events = EventAccumulator(str(tmp_path / "run" / "train"))
    events.Reload()
    skipped = [e.value for e in events.Scalars("skipped_steps")]
    assert skipped[-1] == state["skipped_steps"]
    for tag in (
        "loss",
        "implicit_accuracy",
        "reward_margin",
        "policy_err_w",
        "ref_err_l",
        "grad_norm",
        "lr",
        "pairs_per_s",
        "data_wait_fraction",
    ):
        assert tag in events.Tags()["scalars"], tag


def test_eval_during_training(
    tiny_sd15: Path, latent_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_train(
        latent_sd15,
        tiny_sd15,
        tmp_path,
        "--max-steps",
        "2",
        "--checkpoint-every",
        "0",
        "--val-data",
        str(latent_sd15),
        "--eval-every",
        "1",
        "--eval-max-pairs",
        "8",
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval ")]
    assert len(lines) == 2
    summary = json.loads(lines[-1].removeprefix("eval "))
    assert summary["num_pairs"] == 8 and 0.0 <= summary["implicit_accuracy"] <= 1.0
    assert not (tmp_path / "checkpoints").exists()


def test_data_only_reports_pairs_per_s(latent_sd15: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        train.main(
            [
                "--data",
                str(latent_sd15),
                "--data-only",
                "--max-steps",
                "5",
                "--batch-size",
                "4",
                "--num-workers",
                "1",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pairs"] == 20 and result["pairs_per_s"] > 0
    assert 0 < result["first_batch_s"] < result["seconds"]


def test_bad_config_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--loss must be one of"):
        train.main(["--data", str(tmp_path), "--model", "m", "--loss", "nope"])


@pytest.mark.parametrize(("threshold", "code"), [(0.0, 0), (1.01, 1)])
def test_demo_reports_both_accuracies(
    tiny_sd15: Path,
    latent_sd15: Path,
    tmp_path: Path,
    threshold: float,
    code: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "--config",
        str(Path(__file__).parents[1] / "configs" / "demo.toml"),
        "--data",
        str(latent_sd15),
        "--val-data",
        str(latent_sd15),
        "--model",
        str(tiny_sd15),
        "--output-dir",
        str(tmp_path),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--num-workers",
        "1",
        "--eval-max-pairs",
        "8",
        "--report-to",
        "none",
        "--min-accuracy",
        str(threshold),
        "--defects",
        str(tmp_path / "loser_defects.json"),
    ]
    defects = {str(1000 + i): ("colour", "contrast", "both")[i % 3] for i in range(40)}
    (tmp_path / "loser_defects.json").write_text(json.dumps(defects))
    assert demo.main(argv) == code
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["reference"]["implicit_accuracy"] == 0.5
    assert result["passed"] is (code == 0) and result["policy"]["num_pairs"] == 8
    assert result["policy"]["pairs_by_group"] == {"both": 2, "colour": 3, "contrast": 3}
    assert next(line for line in out if line.startswith("learned:")).count("where the loser is off in") == 3
    gap = result["reference_caption_gap"]
    assert gap["num_pairs"] == 8 and gap["err_own_caption"] > 0 and gap["err_other_caption"] > 0


def test_fixed_batch_reads_only_the_first_batch(latent_sd15: Path, tiny_sd15: Path, tmp_path: Path) -> None:
    import shutil

    from trainer.data import LatentPairStream

    data = tmp_path / "data"
    shutil.copytree(latent_sd15, data)
    manifest = Manifest.load(data)
    first = int(LatentPairStream(data, batch_size=4, seed=0, shards_in_flight=1).sequence.shard_at([0])[0])
    for i, shard in enumerate(manifest.shards):
        if i != first:
            (data / shard.path).write_bytes(b"")  # any read past the first shard now fails
    args = ["--max-steps", "3", "--shards-in-flight", "1", "--num-workers", "0", "--checkpoint-every", "0"]
    run_train(data, tiny_sd15, tmp_path / "fixed", *args, "--fixed-batch")
    assert (tmp_path / "fixed" / "final" / "unet").is_dir()
    with pytest.raises(ValueError, match=r"pairs-.*\.tar: unreadable tar"):
        run_train(data, tiny_sd15, tmp_path / "streamed", *args)
