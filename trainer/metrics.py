"""Training metrics averaged over a logging window and across ranks, plus throughput and data-wait fraction."""

from __future__ import annotations

import torch
from accelerate import Accelerator


class MetricWindow:
    """Sums per-micro-step metrics as tensors (no device sync per step) until `summary` reduces them."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.seconds = 0.0
        self.wait = 0.0
        self.pairs = 0
        self.grad_norm = 0.0

    def add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def add_wait(self, seconds: float) -> None:
        self.wait += seconds

    def add_step(self, seconds: float, *, pairs: int, grad_norm: float) -> None:
        self.seconds += seconds
        self.pairs += pairs
        self.grad_norm = grad_norm

    def summary(self, accelerator: Accelerator) -> dict[str, float]:
        """Means over the window and over ranks (a collective: every rank must call it), then reset."""
        names = sorted(self.sums)
        means = torch.stack([self.sums[k] for k in names]) / max(self.count, 1)
        means = accelerator.reduce(means.to(accelerator.device), "mean")
        timing = torch.tensor([self.seconds, self.wait], device=accelerator.device, dtype=torch.float64)
        seconds, wait = accelerator.reduce(timing, "mean").tolist()  # mean over ranks
        out = {k: float(v) for k, v in zip(names, means.tolist(), strict=True)}
        out.update(
            grad_norm=self.grad_norm,
            pairs_per_s=self.pairs / seconds if seconds > 0 else 0.0,
            data_wait_fraction=wait / seconds if seconds > 0 else 0.0,
        )
        self._reset()
        return out
