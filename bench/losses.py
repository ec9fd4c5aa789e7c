"""`make bench-losses`: every `--loss` trained with the demo's config and step budget on the embedded default, then
its held-out implicit accuracy against the base model (the demo's own evaluation) and its training pairs/s.

CLI: python -m bench.losses --data TRAIN --val-data VAL --model MODEL [--config configs/demo.toml]
     [--losses dpo,mapo,...] [--max-steps N] [--work DIR] [--out FILE.md]
Each loss runs in its own trainer process (no evaluation or checkpoint inside the timed run), then
`python -m trainer.evaluate` scores its final UNet on the validation pairs; one markdown table and one JSON line
per loss come out. Nothing is tuned per loss: every run uses the config's learning rate, batch, seed and steps and
the loss's published hyper-parameters (its entry in schemas/loss_table.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.harness import run_cli
from bench.report import machine, table
from schemas.config import TrainConfig, load_config_file
from schemas.loss_table import LOSSES, NUM_TRAIN_TIMESTEPS, default_beta
from schemas.manifest import Manifest


def train_and_evaluate(loss: str, args: argparse.Namespace, cfg: TrainConfig) -> dict:
    out = Path(args.work) / loss
    train = run_cli(
        [
            "trainer.train",
            "--config",
            args.config,
            "--loss",
            loss,
            "--data",
            args.data,
            "--model",
            args.model,
            "--output-dir",
            str(out),
            "--checkpoint-every",
            "0",
            "--report-to",
            "none",
            *(["--max-steps", str(args.max_steps)] if args.max_steps else []),
        ]
    )
    evaluation = run_cli(
        [
            "trainer.evaluate",
            "--data",
            args.val_data,
            "--model",
            args.model,
            "--unet",
            str(out / "final" / "unet"),
            "--max-pairs",
            str(cfg.eval_max_pairs),
            "--seed",
            str(cfg.seed),
            "--draws",
            str(cfg.eval_draws),
            "--json",
        ]
    )
    return {"loss": loss, "train": train, "eval": evaluation}


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="train encode output (manifest.json)")
    parser.add_argument("--val-data", required=True, help="validation encode output")
    parser.add_argument(
        "--model", required=True, help="the base model: every run starts from it and is scored against it"
    )
    parser.add_argument(
        "--config", default="configs/demo.toml", help="trainer config shared by every loss (no beta in it)"
    )
    parser.add_argument(
        "--losses",
        default=",".join(n for n in LOSSES if n != "diffusion"),
        help="comma-separated --loss names (default: all but diffusion)",
    )
    parser.add_argument("--max-steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--work", default="runs/bench-losses", help="run directories, one per loss")
    parser.add_argument("--out", default=None, help="markdown file (default: stdout only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    losses = [x for x in args.losses.split(",") if x]
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown or not losses:
        raise SystemExit(f"error: --losses: unknown {unknown}; choose from {tuple(LOSSES)}")
    cfg = TrainConfig(**{**load_config_file(args.config), "data": args.data, "model": args.model})
    if cfg.beta is not None:
        raise SystemExit(f"error: {args.config} sets beta; every loss must run with its own default β")
    family = Manifest.load(args.data).model_family
    steps = args.max_steps or cfg.max_steps
    header = (
        f"`python -m bench.losses --data {args.data} --val-data {args.val_data} --model {args.model} "
        f"--config {args.config}` on {time.strftime('%Y-%m-%d')}, {machine()}: {steps} steps of batch "
        f"{cfg.batch_size}, lr {cfg.learning_rate:g}, seed {cfg.seed}; held-out implicit accuracy over "
        f"the first {cfg.eval_max_pairs} validation pairs (fewer if the split has fewer) × {cfg.eval_draws} draws against the base model (which scores "
        "exactly 0.500).\n\n"
    )
    rows = []
    for loss in losses:
        result = train_and_evaluate(loss, args, cfg)
        print(json.dumps(result), flush=True)
        params = ", ".join(
            f"{p.keyword} {p.default:g}" for p in LOSSES[loss].params if p.default != NUM_TRAIN_TIMESTEPS
        )
        beta = default_beta(loss, family)
        rows.append(
            [
                f"`{loss}`",
                f"{beta:g}" if beta else "–",
                params or "–",
                f"{result['eval']['implicit_accuracy']:.3f}",
                str(result["eval"]["num_pairs"]),
                f"{result['eval']['reward_margin']:.2e}",
                f"{result['train']['pairs_per_s']:.0f}",
            ]
        )
        text = header + table(
            ["loss", "β", "other parameters", "held-out accuracy", "pairs", "reward margin", "train pairs/s"],
            rows,
        )
        if args.out:  # rewritten after every loss, so a long run leaves its finished rows behind
            Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
