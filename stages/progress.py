"""What the encode counts while it runs: rows past the VAE (for the progress line, cluster/progress.py, which the
prescan's totals feed) and images through it (for the report).

Why a pass-through step and a counter actor: the rows reach the driver only as written tars, so a step after the
VAE tells an actor how many went through, and a driver thread polls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class RowCounter:
    """A Ray actor the pipeline reports encoded rows to, polled by the driver for `RowProgress`; the VAE actors
    also report the images they encoded (each view counted), for the report's `vae_images`."""

    def __init__(self) -> None:
        self.rows = 0
        self.images = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def count(self) -> int:
        return self.rows

    def add_vae_images(self, images: int) -> None:
        self.images += images

    def vae_images(self) -> int:
        return self.images


@dataclass(frozen=True)
class RunCounts:
    """What this run encoded (a rerun after a kill counts only its own work)."""

    rows: int
    # images through the VAE, each view counted: unique images × views when every recurrence is reused
    vae_images: int


def count_rows(batch: dict[str, Any], counter: Any) -> dict[str, Any]:
    """Pass-through pipeline step: tells the counter how many rows went through the VAE."""
    counter.add.remote(len(batch["ranking_id"]))
    return batch
