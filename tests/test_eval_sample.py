"""evaluation.sample through its real Ray Data job on the tiny SD1.5 and SDXL pipelines: the images are exactly what
diffusers' own pipeline makes with the same generator, a fresh run makes the same bytes, image j of prompt i does not
depend on the batch or the number of workers, --unet (a UNet folder, a checkpoint) and --lora load what the trainer
exports, kill -9 and a rerun make only what is missing, a finished run is a no-op, user mistakes exit 2.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

from evaluation import sample
from evaluation.layout import read_images, read_settings
from evaluation.pipelines import image_seed, png_bytes
from evaluation.prompts import read_prompts
from schemas.families import FAMILIES
from trainer.checkpoint import TrainState, export_final, save_checkpoint
from trainer.model import load_models

REPO = Path(__file__).resolve().parents[1]
# the third line repeats the first: --dedup keeps ids 0, 1, 3, 4
PROMPTS = ["red cube", "blue ball", "red cube", "green cone", "yellow star"]
FAST = ["--steps", "2", "--resolution", "32", "--images-per-prompt", "2"]


def sample_args(model: Path, name: str, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(model),
        "--name",
        name,
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        *FAST,
        *extra,
    ]


def pngs(out: Path, name: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / name).glob("*.png"))}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(int)


def direct_png(pipe: object, prompt: str, seed: int, guidance: float = 7.5, steps: int = 2) -> bytes:
    """The oracle: diffusers' pipeline called as its docs show, with a generator of the image's seed."""
    return png_bytes(
        pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=32,
            width=32,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
    )


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="session")
def sampled(
    tiny_sd15: Path, prompt_file: Path, ray_cluster, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """One OUT with the tiny SD1.5 base sampled once (joined to the session's cluster): 4 prompts × 2 images, one
    image per pipeline call, as the oracle makes them."""
    out = tmp_path_factory.mktemp("sampled")
    argv = sample_args(
        tiny_sd15, "base", prompt_file, out, "--dedup", "--batch-size", "1", "--num-workers", "1"
    )
    assert sample.main([*argv, "--ray-address", ray_cluster.address]) == 0
    return out


@pytest.fixture(scope="session")
def trained_run(tiny_sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trainer run folder holding a LoRA policy three ways: its checkpoint, final/lora and the merged final/unet."""
    run = tmp_path_factory.mktemp("run")
    models = load_models(str(tiny_sd15), lora_rank=4, need_reference=False)
    with torch.no_grad():
        for name, p in models.policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.3)
    optimizer = torch.optim.AdamW([p for p in models.policy.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    accelerator = Accelerator(cpu=True)
    meta = {"config": {"lora_rank": 4, "lora_alpha": 4}}
    save_checkpoint(accelerator, run, TrainState(3, 3), models.policy, optimizer, scheduler, meta, 0)
    export_final(accelerator, models.policy, run, FAMILIES["sd15"])
    AcceleratorState._reset_state(reset_partial_state=True)
    return run


def test_records_settings_and_dedup(sampled: Path, tiny_sd15: Path) -> None:
    records = sorted(read_images(sampled), key=lambda r: (r.prompt_id, r.seed))
    expected = sorted((i, image_seed(0, i, j)) for i in (0, 1, 3, 4) for j in range(2))
    assert [(r.prompt_id, r.seed) for r in records] == expected
    assert all(r.prompt == PROMPTS[r.prompt_id] and r.model == "base" for r in records)
    assert all((sampled / r.path).is_file() for r in records)
    assert sorted(p.name for p in (sampled / "base").glob("*.png")) == sorted(
        Path(r.path).name for r in records
    )
    settings = read_settings(sampled, "base")
    # the dpo preset's guidance for SD1.5 and the pipeline's own scheduler; steps and resolution from the flags
    assert settings["preset"] == "dpo" and settings["guidance"] == 7.5 and settings["scheduler"] == "default"
    assert (settings["steps"], settings["resolution"], settings["dtype"], settings["seed"]) == (
        2,
        32,
        "fp32",
        0,
    )
    assert (
        settings["model"] == str(tiny_sd15.resolve()) and settings["num_prompts"] == 4 and settings["dedup"]
    )


def test_images_are_the_diffusers_pipelines_own(sampled: Path, tiny_sd15: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd15, safety_checker=None, requires_safety_checker=False
    )
    for r in read_images(sampled)[:3]:
        assert (sampled / r.path).read_bytes() == direct_png(pipe, r.prompt, r.seed)


def test_a_finished_run_is_a_no_op(sampled: Path, tiny_sd15: Path, prompt_file: Path, capsys) -> None:
    before = {p: p.stat().st_mtime_ns for p in sampled.rglob("*") if p.is_file()}
    assert sample.main(sample_args(tiny_sd15, "base", prompt_file, sampled, "--dedup")) == 0
    assert "all 8 images already" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in sampled.rglob("*") if p.is_file()} == before


def test_fresh_runs_repeat_the_bytes_whatever_the_batch_and_workers(
    sampled: Path, tiny_sd15: Path, prompt_file: Path, ray_cluster, tmp_path: Path
) -> None:
    """Two workers, three images per call, a new OUT: every image is the fixture's (same noise); two such fresh
    runs give the same bytes."""
    join = ["--dedup", "--ray-address", ray_cluster.address, "--batch-size", "3", "--num-workers", "2"]
    runs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        assert sample.main(sample_args(tiny_sd15, "base", prompt_file, out, *join)) == 0
        runs.append(pngs(out, "base"))
    assert runs[0] == runs[1]
    batched = pngs(sampled, "base")
    assert runs[0].keys() == batched.keys()
    for key, data in batched.items():
        # batched float kernels may round a pixel to the next level, never more
        assert np.abs(pixels(data) - pixels(runs[0][key])).max() <= 1, key


def test_unet_checkpoint_and_lora_sample_the_trained_policy(
    sampled: Path, tiny_sd15: Path, trained_run: Path, prompt_file: Path, ray_cluster, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    join = ["--dedup", "--ray-address", ray_cluster.address, "--num-workers", "1", "--batch-size", "1"]
    checkpoint = trained_run / "checkpoints" / "step_00000003"
    for name, flag, path in (
        ("unet", "--unet", trained_run / "final" / "unet"),
        ("ckpt", "--unet", checkpoint),
        ("lora", "--lora", trained_run / "final" / "lora"),
    ):
        assert sample.main([*sample_args(tiny_sd15, name, prompt_file, out, *join), flag, str(path)]) == 0
    records = {r.key: r for r in read_images(out)}
    # oracles: diffusers with the exported UNet in place, and diffusers' own LoRA loader
    unet = UNet2DConditionModel.from_pretrained(trained_run / "final" / "unet")
    with_unet = StableDiffusionPipeline.from_pretrained(
        tiny_sd15, unet=unet, safety_checker=None, requires_safety_checker=False
    )
    with_lora = StableDiffusionPipeline.from_pretrained(
        tiny_sd15, safety_checker=None, requires_safety_checker=False
    )
    with_lora.load_lora_weights(trained_run / "final" / "lora")
    base = pngs(sampled, "base")
    for (model, prompt_id, seed), r in records.items():
        data = (out / r.path).read_bytes()
        assert data != base[Path(r.path).name], "the trained policy makes other images than the base"
        if model == "unet":
            assert data == direct_png(with_unet, r.prompt, seed)
        else:
            # the LoRA layers unmerged (checkpoint, final/lora) against diffusers' loader of the same adapter
            lora_png = direct_png(with_lora, r.prompt, seed)
            assert np.abs(pixels(data) - pixels(lora_png)).max() <= 1, (model, prompt_id)
    assert read_settings(out, "ckpt")["unet"] == str(checkpoint.resolve())


def test_sdxl_images_are_the_diffusers_pipelines_own(
    tiny_sdxl: Path, prompt_file: Path, ray_cluster, tmp_path: Path
) -> None:
    argv = sample_args(tiny_sdxl, "xl", prompt_file, tmp_path, "--ray-address", ray_cluster.address)
    assert sample.main([*argv, "--num-workers", "1", "--batch-size", "1"]) == 0
    assert read_settings(tmp_path, "xl")["guidance"] == 5.0
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    records = read_images(tmp_path)
    assert len(records) == 2 * len(PROMPTS)
    for r in records[:3]:
        assert (tmp_path / r.path).read_bytes() == direct_png(pipe, r.prompt, r.seed, 5.0)


def test_kill_9_then_rerun_makes_only_the_missing_images(tiny_sd15: Path, tmp_path: Path) -> None:
    """The driver (on its own local cluster) is killed once its first images are out; the rerun keeps those files
    as they are, makes the others, and every image is then what one uninterrupted pipeline call makes (batch 1:
    diffusers' own call, exactly)."""
    prompts = tmp_path / "many.json"
    prompts.write_text(json.dumps([f"prompt {i}" for i in range(30)]))
    out = tmp_path / "out"
    argv = sample_args(tiny_sd15, "base", prompts, out, "--batch-size", "1", "--num-workers", "1")
    cmd = [sys.executable, "-m", "evaluation.sample", *argv, "--images-per-prompt", "1", "--steps", "10"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list((out / "base").glob("*.png")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the local cluster's reaper stops the actor; give a PNG it was renaming the time to land
    time.sleep(5)
    survivors = {p.name: p.stat().st_mtime_ns for p in (out / "base").glob("*.png")}
    assert 0 < len(survivors) < 30, "killed while sampling"
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{30 - len(survivors)} of 30 images to make" in rerun.stdout
    # the one progress line, counting the survivors as done
    assert re.search(r"sample: 30/30 images \(100\.0%\), [\d.]+ images/s, ETA 0:00:00", rerun.stdout)
    assert {n: (out / "base" / n).stat().st_mtime_ns for n in survivors} == survivors
    records = read_images(out)
    assert len(records) == 30 and len(pngs(out, "base")) == 30
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd15, safety_checker=None, requires_safety_checker=False
    )
    for r in records:
        assert (out / r.path).read_bytes() == direct_png(pipe, r.prompt, r.seed, steps=10), r.path


def test_prompt_files(tmp_path: Path) -> None:
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n  a dog \na cat\n")
    assert read_prompts(str(text)) == [(0, "a cat"), (1, "a dog"), (2, "a cat")]
    assert read_prompts(str(text), dedup=True) == [(0, "a cat"), (1, "a dog")]
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(["ü <b>", "a dog", "ü <b>"]))
    assert read_prompts(str(listed), dedup=True) == [(0, "ü <b>"), (1, "a dog")]
    table = pa.table({"caption": ["x", "y", "x"], "jpg_0": [b"1", b"2", b"3"]})
    pq.write_table(table, tmp_path / "test_unique.parquet")
    assert read_prompts(f"{tmp_path}/test_unique.parquet:caption", dedup=True) == [(0, "x"), (1, "y")]
    (tmp_path / "p.csv").write_text('id,caption\n1,"a, b"\n2,c\n')
    assert read_prompts(f"{tmp_path}/p.csv:caption") == [(0, "a, b"), (1, "c")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompts", "{tmp}/none.txt"], "--prompts {tmp}/none.txt: no such file"),
        (["--prompts", "{tmp}/test_unique.parquet:prompt"], "no column 'prompt' (it has caption)"),
        (["--prompts", "{tmp}/test_unique.parquet"], "name the column of prompts"),
        (["--name", "../up"], "--name '../up'"),
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--resolution", "30"], "--resolution 30"),
        (["--scheduler", "bogus"], "--scheduler bogus"),
        (["--unet", "{tmp}"], "neither a UNet folder"),
        (["--lora", "{tmp}"], "no pytorch_lora_weights.safetensors"),
        (["--model", "{tmp}"], "pass the pipeline folder (model_index.json"),
        (["--model", "nobody/no-such-model"], "--model nobody/no-such-model: no local folder of that name"),
    ],
)
def test_user_mistakes_exit_2_before_writing(
    tiny_sd15: Path, prompt_file: Path, tmp_path: Path, capsys, monkeypatch, extra: list[str], message: str
) -> None:
    # no hub here: a hub id is looked up in the cache only
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "test_unique.parquet")
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert sample.main([*sample_args(tiny_sd15, "m", prompt_file, out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in err, err
    assert "Traceback" not in err and not out.exists()


def test_other_image_settings_under_one_name_are_refused(
    sampled: Path, tiny_sd15: Path, prompt_file: Path, capsys
):
    before = sorted(p.name for p in sampled.rglob("*"))
    assert (
        sample.main([*sample_args(tiny_sd15, "base", prompt_file, sampled, "--dedup"), "--steps", "3"]) == 2
    )
    assert "steps: 2 there, 3 now" in capsys.readouterr().err
    assert sorted(p.name for p in sampled.rglob("*")) == before


def test_a_second_sampler_of_one_name_is_refused(tiny_sd15: Path, prompt_file: Path, tmp_path: Path, capsys):
    """While another process holds OUT/<name> (the record lock a run takes), a run of that name exits 2 naming the
    holder, and writes nothing."""
    hold = (
        "import sys, time; from schemas.dir_lock import DirLock; DirLock(sys.argv[1], '.sample.lock', str); "
    )
    hold += "print('held', flush=True); time.sleep(120)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path / "m")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        assert sample.main(sample_args(tiny_sd15, "m", prompt_file, tmp_path)) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"m is being sampled (pid {holder.pid} on" in err, err
    # the holder's lock file only (a killed holder leaves it; the next run takes it over)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["m", "m/.sample.lock"]
