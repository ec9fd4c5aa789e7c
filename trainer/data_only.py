"""`trainer.train --data-only`: the input pipeline timed alone, so a slow run can be told apart from slow data."""

from __future__ import annotations

import json
import sys
import time

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from schemas.config import TrainConfig
from trainer.data import make_loader, make_stream
from trainer.metrics import PROGRESS_INTERVAL_S


def run_data_only(cfg: TrainConfig) -> int:
    """Time the input pipeline alone: max_steps batches, no model work. The first batch (worker start-up, first
    shard group) is timed apart, so pairs/s is the steady state a long run sees."""
    state = PartialState(cpu=not torch.cuda.is_available())
    start = time.perf_counter()
    batches = iter(make_loader(make_stream(cfg, state.process_index, state.num_processes, 0)))
    pairs = len(next(batches)["keys"])
    first_batch_s = time.perf_counter() - start
    steady_start = time.perf_counter()
    steady_pairs = 0
    for _, batch in zip(
        range(cfg.max_steps - 1),
        tqdm(
            batches,
            total=cfg.max_steps - 1,
            disable=not state.is_main_process,
            mininterval=PROGRESS_INTERVAL_S,
        ),
        strict=False,
    ):
        steady_pairs += len(batch["keys"])
    steady_s = time.perf_counter() - steady_start
    pairs += steady_pairs
    rate = steady_pairs / steady_s if steady_pairs else pairs / first_batch_s
    result = {
        "data_only": True,
        "rank": state.process_index,
        "batches": cfg.max_steps,
        "pairs": pairs,
        "first_batch_s": round(first_batch_s, 3),
        "seconds": round(first_batch_s + steady_s, 3),
        "pairs_per_s": round(rate, 2),
    }
    print(
        f"data only: {pairs} pairs in {first_batch_s + steady_s:.2f}s; first batch after {first_batch_s:.2f}s, "
        f"then {rate:.1f} pairs/s",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return 0
