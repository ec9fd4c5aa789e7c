"""The GPU benchmark harness: real architectures as published, and every table produced (tiny models, CPU)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bench import gpu, gpu_models
from bench.decode_resize import measured_vae_rates
from bench.harness import run_cli


def test_architectures_have_the_published_parameter_counts() -> None:
    text = dict(vocab_size=49408, max_position_embeddings=77)
    with torch.device("meta"):  # shapes only: no memory, no init time
        models = {
            "sd15 unet": (UNet2DConditionModel(**gpu_models.SD15_UNET), 859_520_964),
            "sdxl unet": (UNet2DConditionModel(**gpu_models.SDXL_UNET), 2_567_463_684),
            "sd vae": (AutoencoderKL(**gpu_models.SD_VAE), 83_653_863),
            "clip vit-l text": (CLIPTextModel(CLIPTextConfig(**gpu_models.CLIP_L, **text)), 123_060_480),
            "openclip bigG text": (
                CLIPTextModelWithProjection(CLIPTextConfig(**gpu_models.CLIP_BIGG, **text)),
                694_659_840,
            ),
        }
    for name, (model, published) in models.items():
        assert sum(p.numel() for p in model.parameters()) == published, name


def test_tiny_run_writes_every_table(tmp_path: Path) -> None:
    """The whole harness on the tiny SDXL model (compilation left out: the trainer's tests cover --compile):
    every step variant, the best combination, the on-the-fly row and every VAE setting land without a failure."""
    out = tmp_path / "gpu.md"
    argv = [
        "--tiny",
        "--no-compile",
        "--family",
        "sdxl",
        "flow",
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
    ]
    assert gpu.main(argv) == 0
    text = out.read_text()
    for heading in (
        "DPO train step",
        "on-the-fly recipe",
        "VAE encode",
        "TFLOP per pair counted",
        "Flow-DPO step",
    ):
        assert heading in text
    # every flow architecture × LoRA / full fine-tune ran through the trainer's step
    flow = [line for line in text.splitlines() if line.startswith(("| sd3.5-medium |", "| flux.1-dev |"))]
    assert len(flow) == 4 and not any("failed" in line for line in flow), flow
    rows = [line for line in text.splitlines() if line.startswith("| sdxl |")]
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows]
    steps = [c for c in cells if len(c) == 9 and c[2].isdigit()]
    variants = [c[1] for c in steps]
    assert variants[0] == "eager" and variants[1].startswith("best: ") and variants[2] == "LoRA rank 64"
    assert not any("failed" in row or "error" in row.lower() for row in rows)
    # MFU against both peaks: counted FLOPs made it into every step row
    assert all(c[4].endswith("%") and c[5].endswith("%") for c in steps)
    # make bench reads the VAE rates back from this report for its cores-per-GPU table
    vae = [c for c in cells if c[3].startswith(("fp16", "bf16"))]
    assert [c[3] for c in vae] == ["fp16", "fp16", "fp16, channels-last"]
    best = {64: max(float(c[2]) for c in vae)}
    assert measured_vae_rates(out) == ("GPU", best)


def test_robustness_table_has_mean_spread_minimum_and_names_the_runs_below_goal() -> None:
    import statistics

    from bench.robustness import markdown

    accs = {(11, 2000): 0.80, (12, 2000): 0.74, (11, 3000): 0.82, (12, 3000): 0.78}
    defects = {"colour": 0.7, "contrast": 0.8, "both": 0.9}
    table = markdown(
        [{"seed": s, "rows": r, "accuracy": a, "accuracy_by_defect": defects} for (s, r), a in accs.items()],
        goal=0.75,
    )
    row_2000 = next(line for line in table.splitlines() if line.startswith("| 2,000"))
    cells = [c.strip() for c in row_2000.strip("|").split("|")]
    assert cells[1:3] == ["0.800", "0.740"] and cells[3] == "0.770"
    assert cells[4] == f"{statistics.stdev([0.80, 0.74]):.3f}" and cells[5] == "0.740"
    assert cells[6:] == ["0.700", "0.800", "0.900"]
    assert "3 of 4 runs reach 0.75: seed 12 × 2000 rows: 0.740" in table


def test_peak_rss_is_the_childs_own_not_the_parents(tmp_path: Path) -> None:
    """A child that touches 64 MiB, run while this process holds 512 MiB more: its peak must be its own. rusage's
    ru_maxrss would start from this process's resident size at fork and report over 512 MiB."""
    (tmp_path / "rss_child.py").write_text(
        textwrap.dedent(
            """
            import time
            block = bytearray(64 << 20)
            block[::4096] = b"x" * len(block[::4096])
            time.sleep(1.0)
            print("{}")
            """
        )
    )
    held = bytearray(512 << 20)
    held[::4096] = b"x" * len(held[::4096])
    result = run_cli(["rss_child"], env={"PYTHONPATH": str(tmp_path)})
    assert 64 <= result["peak_rss_mib"] < 256, result
    del held
