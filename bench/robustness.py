"""`make robustness`: held-out DPO accuracy of the demo config over preference sets its learning rate was not tuned on.

For every (seed, training rows): a synthetic Pick-a-Pic set (plus 400 validation rows) from that seed, encoded
with the default encode config, DPO with configs/demo.toml against the pretrained reference of `make models`, and the
held-out implicit accuracy, overall and per loser defect. The reference is pretrained once, on its own synthetic set
(seed 1000): a real base model is pretrained on other data than the preference set, so reusing one reference across
preference-set seeds is the real situation, and the seeds here vary only the preference data and its encode.

Each finished run is appended to `WORK/results.jsonl` and skipped on a rerun, so a long measurement can be resumed.

CLI: python -m bench.robustness [--seeds 16 17 18 19 20] [--rows 2000 3000] [--work build/robustness]
     [--model models/tiny-sd15] [--config configs/demo.toml] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from embedded.synthetic import DEFECTS, DEFECTS_FILE, write_synthetic_dataset
from schemas.atomic import atomic_write_bytes
from schemas.config import EncodeConfig, TrainConfig, parse_config
from schemas.sample import pair_key
from schemas.storage import read_json
from stages import encode
from trainer import train
from trainer.evaluate import evaluate, load_for_eval

REPO = Path(__file__).resolve().parents[1]
VAL_ROWS = 400
ROWS_PER_FILE = 500


def encode_split(src: str, out: Path, model: Path) -> None:
    """The default encode config at the demo's resolution (the Makefile's `make encode` call); a no-op when done."""
    argv = ["--src", src, "--out", str(out), "--model", str(model), "--resolution", "64"]
    encode.run(parse_config(EncodeConfig, argv, "encode"))


def one_run(seed: int, rows: int, max_rows: int, work: Path, model: Path, config: Path) -> dict:
    """Data, encode, DPO and held-out evaluation for one (seed, rows); returns the result row.

    A seed's synthetic set has `max_rows` training rows; a smaller size trains on its first `rows` (whole parquet
    files), so both sizes of a seed share one validation set and differ only in how much they train on."""
    t0 = time.perf_counter()
    seed_dir = work / f"seed{seed}"
    parquet = seed_dir / "synthetic"
    if not (parquet / "validation" / DEFECTS_FILE).exists():
        write_synthetic_dataset(
            parquet, seed=seed, rows=max_rows, val_rows=VAL_ROWS, rows_per_file=ROWS_PER_FILE
        )
    init = REPO / "models" / ".init" / model.name  # the encoder half: the random-init VAE and text encoder
    files = sorted((parquet / "train").glob("*.parquet"))[: rows // ROWS_PER_FILE]
    train_data, val_data = seed_dir / "encoded" / f"train{rows}", seed_dir / "encoded" / "validation"
    encode_split(",".join(map(str, files)), train_data, init)
    encode_split(str(parquet / "validation"), val_data, init)
    run_dir = seed_dir / f"dpo{rows}"
    args = [
        "--config",
        str(config),
        "--data",
        str(train_data),
        "--model",
        str(model),
        "--output-dir",
        str(run_dir),
        "--report-to",
        "none",
        "--resume",
        "latest",  # an interrupted batch continues the run; a finished one has nothing left to train
    ]
    if code := train.main(args):
        raise SystemExit(f"error: seed {seed}, {rows} rows: the trainer exited with {code} ({run_dir})")
    cfg = parse_config(TrainConfig, args, "train")
    groups = {pair_key(int(k)): v for k, v in read_json(parquet / "validation" / DEFECTS_FILE).items()}
    models, policy = load_for_eval(str(model), str(run_dir / "final" / "unet"), None)
    result = evaluate(
        models,
        policy,
        val_data,
        batch_size=cfg.batch_size,
        max_pairs=cfg.eval_max_pairs,
        seed=cfg.seed,
        draws=cfg.eval_draws,
        groups=groups,
    )
    return {
        "seed": seed,
        "rows": rows,
        "accuracy": result["implicit_accuracy"],
        "accuracy_by_defect": result["accuracy_by_group"],
        "pairs": result["num_pairs"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def finished(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def markdown(results: list[dict], goal: float) -> str:
    """One row per training-set size: each seed's accuracy, mean, standard deviation, minimum, per-defect means."""
    seeds = sorted({r["seed"] for r in results})
    head = [
        "train rows",
        *[f"seed {s}" for s in seeds],
        "mean",
        "std",
        "min",
        *[f"{d} (mean)" for d in DEFECTS],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rows in sorted({r["rows"] for r in results}):
        runs = {r["seed"]: r for r in results if r["rows"] == rows}
        accs = [r["accuracy"] for r in runs.values()]
        cells = [f"{runs[s]['accuracy']:.3f}" if s in runs else "—" for s in seeds]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        by_defect = [statistics.mean(r["accuracy_by_defect"][d] for r in runs.values()) for d in DEFECTS]
        stats = [f"{statistics.mean(accs):.3f}", f"{spread:.3f}", f"{min(accs):.3f}"]
        lines.append(
            "| " + " | ".join([f"{rows:,}", *cells, *stats, *[f"{a:.3f}" for a in by_defect]]) + " |"
        )
    below = [r for r in results if r["accuracy"] < goal]
    lines.append("")
    lines.append(
        f"{len(results) - len(below)} of {len(results)} runs reach {goal}"
        + (
            ": " + ", ".join(f"seed {r['seed']} × {r['rows']} rows: {r['accuracy']:.3f}" for r in below)
            if below
            else "."
        )
    )
    return "\n".join(lines) + "\n"


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[16, 17, 18, 19, 20],
        help="preference-set seeds (default: not used to tune the learning rate)",
    )
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[2000, 3000],
        help=f"training-set sizes, multiples of {ROWS_PER_FILE}",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=REPO / "build" / "robustness",
        help="data, encodes, runs and results.jsonl",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=REPO / "models" / "tiny-sd15",
        help="the pretrained reference (make models)",
    )
    parser.add_argument(
        "--config", type=Path, default=REPO / "configs" / "demo.toml", help="trainer config of every run"
    )
    parser.add_argument("--goal", type=float, default=0.75, help="held-out accuracy each run should reach")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = arguments()
    args = parser.parse_args(argv)
    if any(r % ROWS_PER_FILE or r > max(args.rows) for r in args.rows):
        print(f"error: --rows must be multiples of {ROWS_PER_FILE}", file=sys.stderr)
        return 2
    if not (args.model / ".pretrained").exists():
        print(f"error: {args.model}: no pretrained reference (run `make models` first)", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "results.jsonl"
    # no Ray cluster held across the batch: each encode starts and stops its own. An idle local cluster's dozen
    # processes slowed the DPO runs beside it by a third (2.1 vs 2.95 steps/s, each batch pinned to one of 2 cores)
    order = [(s, r) for r in args.rows for s in args.seeds]  # every seed at the first size first, so a batch
    for seed, rows in order:  # stopped early still covers all seeds
        if any(r["seed"] == seed and r["rows"] == rows for r in finished(log)):
            continue  # read before every run, so batches over disjoint seeds can share WORK
        result = one_run(seed, rows, max(args.rows), args.work, args.model, args.config)
        print(json.dumps(result), flush=True)
        with log.open("a") as f:
            f.write(json.dumps(result) + "\n")
    wanted = [r for r in finished(log) if r["seed"] in args.seeds and r["rows"] in args.rows]
    table = markdown(wanted, args.goal)
    print(table)
    if args.out:
        atomic_write_bytes(args.out, table.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
