"""The trainer in-process on the tiny models and real latent tars: training, export, resume, skipping, data-only."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from embedded.latent_dataset import write_latent_dataset
from schemas.atomic import process_umask
from schemas.config import TrainConfig
from schemas.manifest import Manifest
from schemas.storage import read_json
from tests.fixtures.damage import flip_byte, poison_pairs
from trainer import demo, train
from trainer.data import make_loader, make_stream
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


def train_argv(data: Path, model: Path, out: Path, *args: str) -> list[str]:
    return ["--data", str(data), "--model", str(model), "--output-dir", str(out), *FAST, *args]


def run_train(data: Path, model: Path, out: Path, *args: str, code: int = 0) -> None:
    assert train.main(train_argv(data, model, out, *args)) == code


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "unet" / "diffusion_pytorch_model.safetensors")


EVAL_FIELDS = ("num_pairs", "implicit_accuracy", "policy_err_w", "policy_err_l", "ref_err_w", "ref_err_l")


def assert_scores_the_export(held_out: dict, model: Path, out: Path, data: Path, **kw: object) -> None:
    """`held_out` (the trainer's own evaluation at its last step) is what `trainer.evaluate` gives the exported
    final/unet against the base model on the same pairs and draws: the trained policy was scored, which a
    reference-vs-reference evaluation (accuracy 0.5, equal errors) would not match."""
    result = evaluate(*load_for_eval(str(model), str(out / "final" / "unet"), None), data, **kw)
    for k in EVAL_FIELDS:
        assert held_out[k] == pytest.approx(result[k], rel=1e-5), k
    assert result["policy_err_w"] != result["ref_err_w"]


# what else each full fine-tune of test_trains_and_exports runs with, so every such flag is run once
FULL_EXTRA = {
    "sd15": ("--optimizer", "adafactor", "--gradient-checkpointing"),
    "sdxl": ("--mixed-precision", "bf16"),
}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trains_and_exports(family: str, lora: bool, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The full fine-tunes also run Adafactor with gradient checkpointing (SD1.5) and bf16 mixed precision
    (SDXL); the LoRA runs leave --scale-lr at its default (on: lr x batch x accumulation x processes)."""
    model, data = request.getfixturevalue(f"tiny_{family}"), request.getfixturevalue(f"latent_{family}")
    extra = ["--lora-rank", "4"] if lora else FULL_EXTRA[family]
    argv = train_argv(data, model, tmp_path, "--max-steps", "2", "--checkpoint-every", "1", *extra)
    assert train.main([a for a in argv if not (lora and a == "--no-scale-lr")]) == 0
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
    config = read_json(ckpt / "state.json")["config"]
    expected = dict(zip(FULL_EXTRA[family][::2], FULL_EXTRA[family][1::2], strict=False)) if not lora else {}
    assert config["optimizer"] == expected.get("--optimizer", "adamw")
    assert config["mixed_precision"] == expected.get("--mixed-precision", "no")
    assert config["gradient_checkpointing"] is ("--gradient-checkpointing" in FULL_EXTRA[family] and not lora)
    # the optimizer the checkpoint holds is Adafactor (its own settings in its parameter groups) or AdamW
    groups = read_json(ckpt / "optimizer.json")["param_groups"]
    assert ("scale_parameter" in groups[0]) is (config["optimizer"] == "adafactor")
    assert config["scale_lr"] is lora and groups[0]["lr"] == pytest.approx(1e-3 * (4 if lora else 1))
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
    lora = load_models(str(tiny_sd15), lora_rank=4)
    noise, t = draw_noise(batch, lora.denoising, seed=0, rank=0, micro_step=0)
    with torch.no_grad():
        for name, p in lora.policy.named_parameters():
            if "lora_B" in name:
                p.normal_()
    base = load_models(str(tiny_sd15), need_reference=False).policy
    ref_w, ref_l = reference_errors(lora, lora.policy, batch, noise, t)
    base_w, base_l = pair_errors(base, lora.denoising, batch, noise, t)
    assert torch.equal(ref_w, base_w) and torch.equal(ref_l, base_l)
    pol_w, _ = pair_errors(lora.policy, lora.denoising, batch, noise, t)
    assert not torch.equal(pol_w, base_w)  # adapters are active again after the reference pass


def test_resume_latest_is_bit_identical(
    tiny_sd15: Path, latent_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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
    capsys.readouterr()
    args = ("--max-steps", "6", "--resume", "latest", "--checkpoint-every", "2")
    run_train(latent_sd15, tiny_sd15, tmp_path / "split", *args, code=2)
    assert "batch_size: checkpoint 2, now 4" in capsys.readouterr().err


def test_non_finite_steps_are_skipped_and_counted(tiny_sd15: Path, tmp_path: Path) -> None:
    data = write_latent_dataset(tmp_path / "data", family="sd15", num_pairs=16, shard_size=4)
    poisoned = set(poison_pairs(data, 1, float("inf")))
    run_train(
        data,
        tiny_sd15,
        tmp_path / "run",
        "--max-skipped-fraction",
        "1",
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
    # exactly the steps whose batch holds a poisoned pair, as the run's stream orders them
    cfg = TrainConfig(data=str(data), model=str(tiny_sd15), batch_size=4, num_workers=1, shards_in_flight=1)
    batches = iter(make_loader(make_stream(cfg, 0, 1, 0)))
    poisoned_steps = sum(bool(poisoned & set(next(batches)["keys"])) for _ in range(8))
    assert 0 < poisoned_steps < 8 and state["skipped_steps"] == poisoned_steps
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
    assert summary["num_pairs"] == 8
    assert_scores_the_export(summary, tiny_sd15, tmp_path, latent_sd15, batch_size=4, max_pairs=8)
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
    assert result["pairs"] == 20 and {"pairs_per_s", "first_batch_s"} <= set(result)
    assert result["first_batch_s"] <= result["seconds"]


def test_steady_rate_leaves_out_the_warm_up_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh GPU machine's first steps take seconds (module loading, autotuning): the steady figure skips them."""
    from trainer import metrics

    clock_ticks = iter([0.0, 10.0, 13.0, 20.0, 25.0])  # start, end of warm-up step 2, summary; the short run
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock_ticks))
    clock = metrics.RunClock(pairs_per_step=4)
    for _ in range(4):
        clock.step()
    expected = {"seconds": 13.0, "pairs_per_s": round(16 / 13, 2), "steady_pairs_per_s": round(8 / 3, 2)}
    assert clock.summary() == expected
    short = metrics.RunClock(pairs_per_step=4)
    short.step()
    assert short.summary()["steady_pairs_per_s"] is None


def test_bad_config_names_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["--data", str(tmp_path), "--model", "m", "--loss", "nope"]) == 2
    assert "error: --loss must be one of" in capsys.readouterr().err
    config = tmp_path / "run.toml"
    config.write_text(
        'max_steps = "20"\nlearning_rate = 1\n'
    )  # a string where a count is due; an int lr is fine
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", str(config), "--data", str(tmp_path), "--model", "m"])
    assert exit_info.value.code == 2
    assert f"config {config}: max_steps = '20' is a str, expected int" in capsys.readouterr().err


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
    # the reference's line is trainer.evaluate of the base model against itself on the demo's pairs and draws; the
    # policy's shares its reference errors, and is the trained UNet
    reference = evaluate(
        *load_for_eval(str(tiny_sd15), None, None), latent_sd15, batch_size=4, max_pairs=8, draws=16
    )
    assert result["reference"] == {k: reference[k] for k in ("implicit_accuracy", "reward_margin")}
    assert result["policy"]["ref_err_w"] == pytest.approx(reference["ref_err_w"], rel=1e-6)
    assert result["policy"]["policy_err_w"] != pytest.approx(reference["policy_err_w"], rel=1e-6)
    assert not [line for line in out if line.startswith("eval ")]  # no repeat of the demo's own evaluation
    assert result["passed"] is (code == 0) and result["policy"]["num_pairs"] == 8
    assert result["policy"]["pairs_by_group"] == {"both": 2, "colour": 3, "contrast": 3}
    assert next(line for line in out if line.startswith("learned:")).count("where the loser is off in") == 3
    gap = result["reference_caption_gap"]
    assert gap["num_pairs"] == 8 and gap["err_own_caption"] > 0 and gap["err_other_caption"] > 0


def test_fixed_batch_reads_only_the_first_batch(
    latent_sd15: Path, tiny_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the bench's step figure: past the warm-up steps, so present after 3
    assert summary["steps_this_run"] == 3 and summary["steady_pairs_per_s"] is not None
    run_train(data, tiny_sd15, tmp_path / "streamed", *args, code=2)
    assert re.search(r"error: .*pairs-.*\.tar: unreadable tar", capsys.readouterr().err)


def test_too_many_skipped_steps_stop_the_run(
    tiny_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A quarter of the pairs have infinite latents: each skipped step is reported as it happens, and the run
    stops (exit 3) once more than --max-skipped-fraction of at least 100 steps were skipped, long before the end."""
    data = write_latent_dataset(tmp_path / "data", family="sd15", num_pairs=16, shard_size=4)
    poison_pairs(data, 1, float("inf"))
    args = (
        "--max-steps",
        "60",
        "--checkpoint-every",
        "0",
        "--shards-in-flight",
        "1",
        "--max-skipped-fraction",
    )
    run_train(data, tiny_sd15, tmp_path / "run", *args, "0.02", code=3)
    err = capsys.readouterr().err
    assert "non-finite loss or gradient, update skipped (1 of" in err
    assert re.search(r"error: 3 of \d+ steps had a non-finite loss or gradient", err)
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize(
    "case", ["val-data-typo", "sdxl-data-sd15-model", "sd15-data-sdxl-model", "val-at-another-resolution"]
)
def test_inputs_are_checked_before_any_work(
    case: str,
    tiny_sd15: Path,
    tiny_sdxl: Path,
    latent_sd15: Path,
    latent_sdxl: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Exit 2 with the flag and file named, and nothing written: not even the output directory."""
    out = tmp_path / "run"
    argv, message = {
        "val-data-typo": (
            train_argv(
                latent_sd15, tiny_sd15, out, "--max-steps", "2", "--val-data", str(tmp_path / "valdata")
            ),
            f"--val-data {tmp_path / 'valdata'}: .*no manifest",
        ),
        "sdxl-data-sd15-model": (
            train_argv(latent_sdxl, tiny_sd15, out),
            f"--data {latent_sdxl}: it was encoded for sdxl, --model {tiny_sd15} is sd15",
        ),
        "sd15-data-sdxl-model": (
            train_argv(latent_sd15, tiny_sdxl, out),
            f"--data {latent_sd15}: it was encoded for sd15, --model {tiny_sdxl} is sdxl",
        ),
        "val-at-another-resolution": (
            train_argv(
                latent_sd15,
                tiny_sd15,
                out,
                "--val-data",
                str(
                    write_latent_dataset(
                        tmp_path / "v", num_pairs=4, resolution=128, latent_shape=(4, 16, 16)
                    )
                ),
            ),
            f"--val-data {tmp_path / 'v'} was encoded at resolution 128, --data {latent_sd15} at 64",
        ),
    }[case]
    assert train.main(argv) == 2
    assert re.search("error: " + message, capsys.readouterr().err)
    assert not out.exists()


def test_resume_applies_what_may_change_and_refuses_what_would_corrupt(
    tiny_sd15: Path, latent_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    run_train(latent_sd15, tiny_sd15, out, "--max-steps", "2", "--checkpoint-every", "2")
    capsys.readouterr()
    more = ("--max-steps", "4", "--checkpoint-every", "2", "--resume", "latest")
    run_train(latent_sd15, tiny_sd15, out, *more, "--learning-rate", "2e-3")
    printed = capsys.readouterr().out
    assert "resume: learning_rate: checkpoint 0.001, now 0.002 (applied)" in printed
    assert "resume: max_steps: checkpoint 2, now 4 (applied)" in printed
    step4 = out / "checkpoints" / "step_00000004"
    assert read_json(step4 / "state.json")["lr_scheduler"]["base_lrs"] == [0.002]
    assert [g["lr"] for g in read_json(step4 / "optimizer.json")["param_groups"]] == [0.002]

    other_data = write_latent_dataset(tmp_path / "other", num_pairs=24)
    for extra, named in [
        (("--loss", "sft"), "loss: checkpoint 'dpo', now 'sft'"),
        (("--beta", "1000"), "beta: checkpoint 5000.0, now 1000.0"),  # unset = the published 5000
        (("--seed", "3"), "seed: checkpoint 0, now 3"),
        (("--lora-rank", "4"), "lora_rank: checkpoint 0, now 4"),
        (("--optimizer", "adafactor"), "optimizer: checkpoint 'adamw', now 'adafactor'"),
    ]:
        run_train(latent_sd15, tiny_sd15, out, *more, *extra, code=2)
        assert named in capsys.readouterr().err, extra
    run_train(other_data, tiny_sd15, out, *more, code=2)
    assert f"data: {other_data} is not the data the run trained on" in capsys.readouterr().err
    other_model = shutil.copytree(tiny_sd15, tmp_path / "same-weights-elsewhere")
    run_train(latent_sd15, other_model, out, *more, code=2)
    assert f"model: checkpoint {str(tiny_sd15)!r}, now {str(other_model)!r}" in capsys.readouterr().err
    run_train(
        latent_sd15, tiny_sd15, out, *more, "--beta", "5000"
    )  # the default, given explicitly: no change
    assert "beta" not in capsys.readouterr().out


def test_a_damaged_sample_stops_training_naming_shard_and_key(
    tiny_sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by the loader worker (a process of its own): exit 2 with the worker's message, not a traceback."""
    data = write_latent_dataset(tmp_path / "data", num_pairs=8, shard_size=4)
    shard = data / Manifest.load(data).shards[0].path
    key = flip_byte(shard, ".safetensors", nth=1)
    run_train(data, tiny_sd15, tmp_path / "run", "--max-steps", "4", "--checkpoint-every", "0", code=2)
    assert f"error: {shard}:{key}: tensor data fails its checksum" in capsys.readouterr().err
