"""The end-to-end demo: held-out implicit accuracy of the reference (0.5 by construction), DPO training, and the
trained policy's accuracy, which must reach --min-accuracy (exit 1 otherwise).

  python -m trainer.demo --config configs/demo.toml --data TRAIN --val-data VAL --model MODEL --output-dir RUN
Every trainer flag is accepted; --min-accuracy (default 0.65) is the demo's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from schemas.config import TrainConfig, parse_config
from trainer import train
from trainer.evaluate import evaluate, load_for_eval


def held_out_accuracy(cfg: TrainConfig, unet_dir: str | None) -> dict[str, float]:
    models, policy = load_for_eval(cfg.model, unet_dir, None)
    return evaluate(
        models,
        policy,
        cfg.val_data,
        batch_size=cfg.batch_size,
        max_pairs=cfg.eval_max_pairs,
        seed=cfg.seed,
        beta=cfg.beta,
        draws=cfg.eval_draws,
    )


def main(argv: list[str] | None = None) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--min-accuracy", type=float, default=0.65)
    args, rest = own.parse_known_args(argv if argv is not None else sys.argv[1:])
    cfg = parse_config(TrainConfig, rest, __doc__.split("\n\n")[0])
    if not cfg.val_data:
        raise SystemExit("error: the demo needs --val-data")
    before = held_out_accuracy(cfg, None)
    print(
        f"reference implicit accuracy on {before['num_pairs']} held-out pairs: {before['implicit_accuracy']:.3f}"
    )
    train.main(rest)
    after = held_out_accuracy(cfg, str(Path(cfg.output_dir) / "final" / "unet"))
    ok = after["implicit_accuracy"] >= args.min_accuracy
    print(
        f"reference accuracy {before['implicit_accuracy']:.3f} → DPO policy accuracy "
        f"{after['implicit_accuracy']:.3f} (reward margin {after['reward_margin']:.3g}); "
        f"{'PASS' if ok else 'FAIL'}: threshold {args.min_accuracy}"
    )
    print(json.dumps({"reference": before, "policy": after, "min_accuracy": args.min_accuracy, "passed": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
