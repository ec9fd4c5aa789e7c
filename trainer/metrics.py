"""Training metrics averaged over a logging window and across ranks, plus throughput and data-wait fraction."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator

if TYPE_CHECKING:
    from trainer.step import StepResult

# how often a progress bar redraws: live in a terminal, a line every 30 s in a log file
PROGRESS_INTERVAL_S = 0.1 if sys.stderr.isatty() else 30.0


class MetricWindow:
    """Sums per-micro-batch metrics as device tensors, so a step adds no host sync; `summary` reads them once per
    logging window."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.seconds = 0.0
        self.wait = 0.0
        self.pairs = 0
        # the last step's, read at summary time
        self.grad_norm: torch.Tensor | None = None

    def add_step(self, result: StepResult, *, pairs: int) -> None:
        for values in result.metrics:
            for k, v in values.items():
                v = v.detach().float()
                self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.count += 1
        self.seconds += result.seconds
        self.wait += result.data_wait_s
        self.pairs += pairs
        self.grad_norm = result.grad_norm

    def summary(self, accelerator: Accelerator) -> dict[str, float]:
        """Means over the window and over ranks (a collective: every rank must call it), then reset."""
        names = sorted(self.sums)
        means = torch.stack([self.sums[k] for k in names]) / max(self.count, 1)
        means = accelerator.reduce(means.to(accelerator.device), "mean")
        timing = torch.tensor([self.seconds, self.wait], device=accelerator.device, dtype=torch.float64)
        # mean over ranks
        seconds, wait = accelerator.reduce(timing, "mean").tolist()
        out = {k: float(v) for k, v in zip(names, means.tolist(), strict=True)}
        out.update(
            grad_norm=float(self.grad_norm) if self.grad_norm is not None else 0.0,
            pairs_per_s=self.pairs / seconds if seconds > 0 else 0.0,
            data_wait_fraction=wait / seconds if seconds > 0 else 0.0,
        )
        self._reset()
        return out


class RunClock:
    """Pairs/s of this run, and of its steady state: the first WARMUP_STEPS steps pay CUDA module loading, kernel
    autotuning, the allocator's growth and the loader's first shards (seconds on a fresh GPU machine), which a long
    run does not see. Host time is device time here because every optimizer step ends with one host sync."""

    WARMUP_STEPS = 2

    def __init__(self, pairs_per_step: int) -> None:
        self.pairs_per_step = pairs_per_step
        self.steps = 0
        self.start = time.perf_counter()
        self.steady_start: float | None = None

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.WARMUP_STEPS:
            self.steady_start = time.perf_counter()

    def summary(self) -> dict[str, float | None]:
        now = time.perf_counter()
        seconds = now - self.start
        steady_steps = self.steps - self.WARMUP_STEPS
        steady = None
        if self.steady_start is not None and steady_steps > 0:
            steady = round(steady_steps * self.pairs_per_step / (now - self.steady_start), 2)
        return {
            "seconds": round(seconds, 3),
            "pairs_per_s": round(self.steps * self.pairs_per_step / seconds, 2) if self.steps else None,
            "steady_pairs_per_s": steady,
        }
