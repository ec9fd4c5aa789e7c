"""Compare two models of an evaluation folder pair by pair: win rates per scorer, intervals, OUT/report.html.

CLI: python -m evaluation.compare --images OUT --a NAME --b NAME [--json] [--bootstrap N] [--seed S]

A pair is the two images of a and b with the same (prompt_id, seed), both scored by one scorer (one version of it).
Per scorer: the means over its pairs; b's wins, ties and losses against a; win_rate = (wins + ½·ties) / n, ties
counted as half as Diffusion-SDPO's pickscore_vs_utils.py does by default, and win_rate_ties_as_losses = wins / n,
its ties-as-0 figure; ci95, the 2.5th and 97.5th percentiles of win_rate over --bootstrap resamplings of the pairs
(seeded, so one OUT always gives one interval). `macro` is the mean win rate over the scorers, as Diffusion-SDPO's
summary_vs_scores.py averages its metrics. A scorer is named by its name, or name@version where OUT holds two
versions of it (HPS v2.0 and v2.1 scores do not compare). A metric over zero pairs is an error, never 0.5.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from evaluation.cli import run_cli
from evaluation.layout import IMAGES_FILE, REPORT_FILE, SCORES_FILE, read_images, read_scores, read_settings
from evaluation.report import PairRow, write_report
from schemas.errors import InputError

BOOTSTRAP = 2000


@dataclass(frozen=True)
class PairStats:
    n: int
    wins: int
    ties: int
    losses: int
    mean_a: float
    mean_b: float
    win_rate: float
    win_rate_ties_as_losses: float
    ci95: tuple[float, float]


def paired_stats(a: np.ndarray, b: np.ndarray, bootstrap: int = BOOTSTRAP, seed: int = 0) -> PairStats:
    """b against a over paired scores (a[i] and b[i] are one pair); raises ValueError on zero pairs."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need two equal-length vectors, got shapes {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        raise ValueError("no pairs: a win rate over zero pairs is undefined")
    outcome = np.where(b > a, 1.0, np.where(b == a, 0.5, 0.0))
    rng = np.random.default_rng(seed)
    # resampled win rates, a block of resamplings at a time so memory stays bounded for large n
    rates = np.concatenate(
        [outcome[rng.integers(0, n, size=(k, n))].mean(1) for k in _blocks(bootstrap, max(1, 4_000_000 // n))]
    )
    low, high = np.percentile(rates, [2.5, 97.5])
    wins, ties = int((outcome == 1.0).sum()), int((outcome == 0.5).sum())
    return PairStats(
        n=n,
        wins=wins,
        ties=ties,
        losses=n - wins - ties,
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        win_rate=float(outcome.mean()),
        win_rate_ties_as_losses=wins / n,
        ci95=(float(low), float(high)),
    )


def _pair_order(pair: tuple) -> tuple:
    """(prompt_id, seed) in prompt order: integer ids by value, then string ids."""
    prompt_id, seed = pair
    return (isinstance(prompt_id, str), prompt_id if isinstance(prompt_id, int) else 0, str(prompt_id), seed)


def _blocks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="evaluation folder OUT")
    parser.add_argument("--a", required=True, help="the reference model (e.g. the base)")
    parser.add_argument(
        "--b", required=True, help="the model whose wins over --a are counted (e.g. the tuned one)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    parser.add_argument(
        "--bootstrap", type=int, default=BOOTSTRAP, help=f"resamplings for ci95 (default: {BOOTSTRAP})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling (default: 0)")
    return parser


def compare(args: argparse.Namespace) -> dict:
    out: Path = args.images
    if args.bootstrap < 1:
        raise InputError(f"--bootstrap {args.bootstrap}: must be at least 1")
    images = read_images(out)
    models = sorted({r.model for r in images})
    for flag, name in (("--a", args.a), ("--b", args.b)):
        if name not in models:
            raise InputError(
                f"{flag} {name}: no such model in {out / IMAGES_FILE} (it has {', '.join(models)})"
            )
    if args.a == args.b:
        raise InputError(f"--a and --b are both {args.a}: compare two different models")
    by_key = {r.key: r for r in images}
    prompts: dict[tuple, str] = {}
    for r in (r for r in images if r.model in (args.a, args.b)):
        if prompts.setdefault((r.prompt_id, r.seed), r.prompt) != r.prompt:
            raise InputError(
                f"{out / IMAGES_FILE}: prompt_id {r.prompt_id}, seed {r.seed} has different prompts for "
                f"{args.a} and {args.b}; their images do not pair up"
            )
    records = read_scores(out)
    if not records:
        raise InputError(
            f"{out / SCORES_FILE}: no scores; run python -m evaluation.score --images {out} first"
        )
    # (scorer, version) → model → (prompt_id, seed) → score, for images OUT still lists
    scores: dict[tuple[str, str], dict[str, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    for s in records:
        if s.model in (args.a, args.b) and (s.model, s.prompt_id, s.seed) in by_key:
            scores[(s.scorer, s.version)][s.model][(s.prompt_id, s.seed)] = s.score
    versions = defaultdict(list)
    for name, version in scores:
        versions[name].append(version)
    result: dict = {"a": args.a, "b": args.b, "scorers": {}, "skipped": {}}
    table: dict[str, dict[tuple, tuple[float, float]]] = {}
    for (name, version), per_model in sorted(scores.items()):
        label = name if len(versions[name]) == 1 else f"{name}@{version}"
        pairs = sorted(set(per_model[args.a]) & set(per_model[args.b]), key=_pair_order)
        if not pairs:
            result["skipped"][label] = (
                f"0 pairs ({len(per_model[args.a])} images of {args.a}, {len(per_model[args.b])} of {args.b})"
            )
            continue
        a = np.array([per_model[args.a][p] for p in pairs])
        b = np.array([per_model[args.b][p] for p in pairs])
        stats = paired_stats(a, b, args.bootstrap, args.seed)
        result["scorers"][label] = {"version": version, **asdict(stats)}
        table[label] = {p: (per_model[args.a][p], per_model[args.b][p]) for p in pairs}
    if not result["scorers"]:
        raise InputError(
            f"--a {args.a} --b {args.b}: no (prompt_id, seed) has scores of both by any scorer in "
            f"{out / SCORES_FILE} ({'; '.join(f'{k}: {v}' for k, v in result['skipped'].items())})"
        )
    rates = [s["win_rate"] for s in result["scorers"].values()]
    strict = [s["win_rate_ties_as_losses"] for s in result["scorers"].values()]
    result["macro"] = {"win_rate": float(np.mean(rates)), "win_rate_ties_as_losses": float(np.mean(strict))}
    rows = [
        PairRow(
            prompt_id=key[0],
            seed=key[1],
            prompt=prompt,
            path_a=by_key[(args.a, *key)].path,
            path_b=by_key[(args.b, *key)].path,
            scores={label: t[key] for label, t in table.items() if key in t},
        )
        for key, prompt in sorted(prompts.items(), key=lambda kv: _pair_order(kv[0]))
        if (args.a, *key) in by_key and (args.b, *key) in by_key
    ]
    settings = {m: read_settings(out, m) for m in (args.a, args.b)}
    write_report(out / REPORT_FILE, result, rows, settings)
    result["report"] = str(out / REPORT_FILE)
    return result


def print_table(result: dict) -> None:
    print(f"compare: {result['b']} (b) against {result['a']} (a); win rate = (wins + ½·ties) / pairs")
    print(f"{'scorer':<24} {'pairs':>6} {'mean a':>9} {'mean b':>9} {'W/T/L':>13} {'win rate':>9}  95% CI")
    for label, s in result["scorers"].items():
        wtl = f"{s['wins']}/{s['ties']}/{s['losses']}"
        low, high = s["ci95"]
        print(
            f"{label:<24} {s['n']:>6} {s['mean_a']:>9.4f} {s['mean_b']:>9.4f} {wtl:>13} {s['win_rate']:>9.3f}"
            f"  [{low:.3f}, {high:.3f}]  (ties as losses {s['win_rate_ties_as_losses']:.3f})"
        )
    for label, why in result["skipped"].items():
        print(f"{label:<24} not compared: {why}")
    m = result["macro"]
    print(
        f"macro over {len(result['scorers'])} scorers: win rate {m['win_rate']:.3f} "
        f"(ties as losses {m['win_rate_ties_as_losses']:.3f}); report {result['report']}"
    )


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)

    def compare_and_print() -> None:
        result = compare(args)
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        else:
            print_table(result)

    return run_cli(compare_and_print, "compare: interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
