"""The trainer's input: an infinite, rank-sharded stream of latent-pair batches that resumes exactly in O(1).

Layout of the stream (deterministic slots over a seeded shard sequence, plus cross-shard mixing):
* The global shard sequence is epoch after epoch of a seeded permutation of the manifest's shards. With
  S = world_size × num_workers "slots" (slot = rank × W + worker role), slot s reads positions s, s + S, s + 2S, …,
  so ranks see disjoint data and no slot ever runs dry, however few shards there are.
* A worker reads its shards `shards_in_flight` at a time and permutes the group's samples with a generator seeded by
  (seed, slot, group): mixing without a shuffle buffer whose state would need saving.
* Batches are formed inside the worker; all per-sample randomness (posterior noise, flip, caption dropout) is seeded
  by (seed, slot, batch index), so batch n is a pure function of n.
* Resuming at loader batch n therefore needs only n: each worker computes where its logical stream stands from the
  manifest's per-shard counts and opens just the group it lands in.

`data_dir` is a path or any fsspec URL (s3://…): shards are streamed front to back (sequential reads with
read-ahead, never downloaded first), and resume still needs only the manifest's counts.

The loader must NOT go through `accelerator.prepare`, which would shard the already rank-sharded stream again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from schemas import storage
from schemas.config import TrainConfig
from schemas.errors import InputError
from schemas.families import FAMILIES
from schemas.manifest import MANIFEST_NAME, Manifest
from schemas.sample import (
    CHECKSUM,
    PAIR_META_EXT,
    SIDES,
    TENSORS_EXT,
    CorruptSampleError,
    PairMeta,
    decode_tensors,
    latent_tensor_names,
    read_tar,
    tensor_name,
)
from schemas.seeds import seed_of
from trainer.preemption import ignore_stop_signals, stop_workers_at_exit
from trainer.text_store import TextEmbeddingStore

_MEMBER_EXTS = (PAIR_META_EXT, TENSORS_EXT)
# shard-sequence positions whose epoch permutations are drawn in one vectorised call
_BLOCK_POSITIONS = 1 << 16


def check_checksums(manifest: Manifest, data_dir: str | Path) -> None:
    """The trainer reads only what it can verify: an encode output without per-member checksums is refused."""
    if manifest.checksum != CHECKSUM:
        raise ValueError(
            f"{storage.join(data_dir, MANIFEST_NAME)}: encoded without per-sample {CHECKSUM} checksums (manifest "
            f"checksum {manifest.checksum!r}), so damaged files could not be detected; re-encode it"
        )


def check_listed_files(manifest: Manifest, data_dir: str | Path) -> None:
    """Every tar the manifest lists is there: a deleted shard or text tar is found before the run starts, not at the
    step that first reads it. One listing per folder (a few requests on object storage, not one per shard)."""
    by_folder: dict[str, list[str]] = {}
    for entry in [*manifest.shards, *manifest.text_shards]:
        folder, _, name = entry.path.rpartition("/")
        by_folder.setdefault(folder, []).append(name)
    for folder, names in by_folder.items():
        present = set(storage.list_names(storage.join(data_dir, folder) if folder else data_dir))
        missing = [n for n in names if n not in present]
        if missing:
            raise InputError(
                f"{len(missing)} of the files manifest.json lists are missing, e.g. "
                f"{storage.join(data_dir, folder, missing[0])}; restore them or re-encode into a new --out"
            )


@dataclass(frozen=True)
class _RawPair:
    """A pair sample as read from its tar: undecoded bytes, so a group in flight costs what its files cost."""

    key: str
    # "shard.tar:key", for error messages
    where: str
    meta: bytes
    tensors: bytes


def read_pair_shard(path: str, expected: int) -> list[_RawPair]:
    """All pair samples of one tar (a path or any fsspec URL), in file order, streamed front to back: sequential
    reads only, no download first. Only .json and .safetensors members are read.

    The count must match the manifest: resume positions are computed from the manifest counts alone.
    """
    out = []
    try:
        for sample in read_tar(path, read=_MEMBER_EXTS):
            missing = [ext for ext in _MEMBER_EXTS if ext not in sample.data]
            if missing:
                raise ValueError(f"{sample.where}: pair sample lacks members {missing}")
            out.append(
                _RawPair(sample.key, sample.where, sample.data[PAIR_META_EXT], sample.data[TENSORS_EXT])
            )
    # a truncated or malformed tar: damaged data, named like a bad sample
    except ValueError as e:
        raise CorruptSampleError(str(e)) from e
    if len(out) != expected:
        raise CorruptSampleError(f"{path}: {len(out)} samples, manifest says {expected}")
    return out


class _ShardSequence:
    """The global shard sequence: epoch e is a permutation of all shards, epochs concatenated.

    Permutations are drawn for a block of E = max(1, 2**16 // n) epochs at once from a generator seeded by
    (seed, e // E) (row e % E), so walking a million steps ahead costs a few argsorts instead of a Python loop per
    epoch.
    """

    def __init__(self, counts: np.ndarray, seed: int) -> None:
        self.counts = counts
        self.seed = seed
        self.n = len(counts)
        self.block_epochs = max(1, _BLOCK_POSITIONS // self.n)
        self.block_len = self.block_epochs * self.n
        self._cache: dict[int, np.ndarray] = {}

    def block(self, b: int) -> np.ndarray:
        if b not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            rng = np.random.default_rng([self.seed, b])
            perms = np.argsort(rng.random((self.block_epochs, self.n)), axis=1, kind="stable")
            self._cache[b] = perms.ravel()
        return self._cache[b]

    def shard_at(self, positions: np.ndarray) -> np.ndarray:
        return np.array(
            [self.block(int(p) // self.block_len)[int(p) % self.block_len] for p in positions], dtype=np.int64
        )

    def locate(self, slot: int, slots: int, skip: int) -> tuple[int, int]:
        """For slot `slot`'s sub-sequence (positions slot + j·slots): the j holding sample `skip` of the slot's
        stream, and how many samples precede shard j. Vectorised over one block of positions at a time."""
        before = 0
        b = 0
        while True:
            lo = b * self.block_len
            first = lo + (slot - lo) % slots
            positions = np.arange(first, lo + self.block_len, slots)
            if len(positions):
                cum = before + np.cumsum(self.counts[self.block(b)[positions - lo]])
                if cum[-1] > skip:
                    i = int(np.searchsorted(cum, skip, side="right"))
                    prior = int(cum[i - 1]) if i else before
                    return (int(positions[i]) - slot) // slots, prior
                before = int(cum[-1])
            b += 1


class LatentPairStream(IterableDataset):
    """Infinite batches of cached latent pairs for one rank; see the module docstring for the layout.

    `start_batch` is the number of batches this rank's loader already delivered; the same seed, world size and
    num_workers reproduce the uninterrupted stream from there. Random flips use the cached `_flip` latents, so they
    only happen when the encode cached them.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        start_batch: int = 0,
        caption_dropout: float = 0.0,
        shards_in_flight: int = 4,
        random_flip: bool = True,
        sample_latents: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1 or shards_in_flight < 1 or num_workers < 0 or start_batch < 0 or seed < 0:
            raise ValueError(
                "batch_size and shards_in_flight must be >= 1; num_workers, start_batch, seed >= 0"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout {caption_dropout} outside [0, 1]")
        self.data_dir = storage.local_path(data_dir)
        self.manifest = Manifest.load(self.data_dir)
        if self.manifest.num_samples == 0:
            raise ValueError(f"{self.data_dir}: manifest lists no pair samples")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.start_batch = start_batch
        self.caption_dropout = caption_dropout
        self.shards_in_flight = shards_in_flight
        self.random_flip = random_flip and self.manifest.flip_variants
        self.sample_latents = sample_latents
        self.collate = PairCollator(self.data_dir, self.manifest)
        self.sequence = _ShardSequence(
            np.array([s.num_samples for s in self.manifest.shards], dtype=np.int64), seed
        )

    def _role(self) -> tuple[int, int]:
        """(slot, workers per rank) for the calling process, with the resume rotation applied."""
        info = get_worker_info()
        workers = max(self.num_workers, 1)
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != workers:
            raise RuntimeError(
                f"stream built for num_workers={self.num_workers}, loader has {info.num_workers}"
            )
        role = (worker + self.start_batch) % workers
        return self.rank * workers + role, workers

    def _group_samples(self, slot: int, slots: int, group: int) -> list[_RawPair]:
        k = self.shards_in_flight
        positions = slot + slots * np.arange(group * k, (group + 1) * k)
        samples: list[_RawPair] = []
        for shard in self.sequence.shard_at(positions):
            entry = self.manifest.shards[shard]
            samples.extend(read_pair_shard(storage.join(self.data_dir, entry.path), entry.num_samples))
        order = np.random.default_rng([self.seed, slot, group]).permutation(len(samples))
        return [samples[i] for i in order]

    def __iter__(self) -> Iterator[dict]:
        slot, workers = self._role()
        slots = self.world_size * workers
        role = slot - self.rank * workers
        batch_index = self.start_batch // workers + (role < self.start_batch % workers)
        skip = batch_index * self.batch_size
        j, before = self.sequence.locate(slot, slots, skip)
        group = j // self.shards_in_flight
        first = group * self.shards_in_flight
        # samples of the landing group that precede shard j, from the manifest counts (no file opened)
        before -= int(self.sequence.counts[self.sequence.shard_at(slot + slots * np.arange(first, j))].sum())
        offset = skip - before
        pending: list[_RawPair] = []
        while True:
            pending.extend(self._group_samples(slot, slots, group)[offset:])
            offset = 0
            group += 1
            start = 0
            # a batch may straddle two groups
            while len(pending) - start >= self.batch_size:
                yield self._make_batch(pending[start : start + self.batch_size], slot, batch_index)
                start += self.batch_size
                batch_index += 1
            pending = pending[start:]

    def _make_batch(self, batch: list[_RawPair], slot: int, batch_index: int) -> dict:
        g = torch.Generator().manual_seed(seed_of(self.seed, slot, batch_index))
        n = len(batch)
        flips = (torch.rand(n, generator=g) < 0.5) & self.random_flip
        drops = torch.rand(n, generator=g) < self.caption_dropout
        eps = None
        if self.sample_latents and self.manifest.latent_mode == "moments":
            eps = torch.randn((n, 2, *self.manifest.latent_shape), generator=g)
        return self.collate(batch, flips, drops, eps)


class PairCollator:
    """Decodes raw pair samples into a training batch: scaled latents, text embeddings, labels, SDXL time ids."""

    def __init__(self, data_dir: str, manifest: Manifest) -> None:
        check_checksums(manifest, data_dir)
        self.manifest = manifest
        self.required = latent_tensor_names(manifest.latent_mode, manifest.flip_variants)
        self.text = TextEmbeddingStore(data_dir, manifest)
        family = FAMILIES[manifest.model_family]
        self.time_ids = family.time_ids
        self.pooled = "pooled_prompt_embeds" in family.text_tensors

    def _latents(
        self, means: list[torch.Tensor], logvars: list[torch.Tensor], eps: torch.Tensor | None
    ) -> torch.Tensor:
        """(mean + exp(logvar / 2)·eps − shift)·scale for the whole batch at once, [n, 2, C, h, w] with the
        preferred image first; the plain mean when eps is None. One vectorised op per step instead of one per
        image keeps the stream far ahead of the accelerator."""
        latents = torch.stack(means).float()
        if eps is not None:
            latents += torch.exp(0.5 * torch.stack(logvars).float()) * eps
        if self.manifest.vae_shift_factor is not None:
            latents -= self.manifest.vae_shift_factor
        return latents.mul_(self.manifest.vae_scaling_factor).unflatten(0, (-1, 2))

    def __call__(
        self, batch: list[_RawPair], flips: torch.Tensor, drops: torch.Tensor, eps: torch.Tensor | None
    ) -> dict:
        out: dict[str, list] = {
            k: []
            for k in (
                "means",
                "logvars",
                "prompt_embeds",
                "pooled_prompt_embeds",
                "w_time_ids",
                "l_time_ids",
                "label",
                "keys",
            )
        }
        resolution = self.manifest.resolution
        for i, raw in enumerate(batch):
            tensors = decode_tensors(
                raw.tensors,
                self.required,
                raw.where,
                companion=raw.meta,
                require_checksum=True,
            )
            meta = PairMeta.from_json_bytes(raw.meta, raw.where)
            flip = bool(flips[i])
            for side, image in zip(SIDES, (meta.w, meta.l), strict=True):
                mean = tensors[tensor_name(side, "mean", flip)]
                if list(mean.shape) != self.manifest.latent_shape:
                    raise ValueError(
                        f"{raw.where}: {tensor_name(side, 'mean', flip)} shape {list(mean.shape)}, manifest says "
                        f"{self.manifest.latent_shape}"
                    )
                out["means"].append(mean)
                if eps is not None:
                    out["logvars"].append(tensors[tensor_name(side, "logvar", flip)])
                if self.time_ids:
                    top, left = image.crop_top_left_flip if flip else image.crop_top_left
                    out[f"{side}_time_ids"].append([*image.original_size, top, left, resolution, resolution])
            try:
                text = self.text.empty() if drops[i] else self.text.get(meta.caption_key)
            except KeyError as e:
                raise KeyError(f"{raw.where}: {e.args[0]}") from None
            out["prompt_embeds"].append(text["prompt_embeds"])
            if self.pooled:
                out["pooled_prompt_embeds"].append(text["pooled_prompt_embeds"])
            out["label"].append(0.5 if meta.label_0 == 0.5 else 1.0)
            out["keys"].append(raw.key)
        latents = self._latents(out["means"], out["logvars"], None if eps is None else eps.flatten(0, 1))
        result: dict = {
            "w_latents": latents[:, 0],
            "l_latents": latents[:, 1],
            "prompt_embeds": torch.stack(out["prompt_embeds"]).float(),
            "label": torch.tensor(out["label"], dtype=torch.float32),
            "keys": out["keys"],
        }
        if self.pooled:
            result["pooled_prompt_embeds"] = torch.stack(out["pooled_prompt_embeds"]).float()
        if self.time_ids:
            for side in ("w", "l"):
                result[f"{side}_time_ids"] = torch.tensor(out[f"{side}_time_ids"], dtype=torch.float32)
        return result


def make_loader(stream: LatentPairStream, *, pin_memory: bool = False) -> DataLoader:
    """A plain in-order DataLoader over the stream (batches come pre-formed); keep it out of accelerator.prepare."""
    workers = stream.num_workers
    if workers:
        stop_workers_at_exit()
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        in_order=True,
        worker_init_fn=ignore_stop_signals,
    )


def iter_eval_batches(
    data_dir: str | Path, *, batch_size: int, max_pairs: int | None = None
) -> Iterator[dict]:
    """Every pair once, in manifest order, deterministically: posterior means, no flip, no caption dropout."""
    data_dir = storage.local_path(data_dir)
    manifest = Manifest.load(data_dir)
    collate = PairCollator(data_dir, manifest)
    limit = manifest.num_samples if max_pairs is None else min(max_pairs, manifest.num_samples)
    pending: list[_RawPair] = []
    done = 0
    for entry in manifest.shards:
        if done + len(pending) >= limit:
            break
        pending.extend(read_pair_shard(storage.join(data_dir, entry.path), entry.num_samples))
        pending = pending[: limit - done]
        while len(pending) >= batch_size or (pending and done + len(pending) == limit):
            batch, pending = pending[:batch_size], pending[batch_size:]
            off = torch.zeros(len(batch), dtype=torch.bool)
            yield collate(batch, off, off, None)
            done += len(batch)


def make_stream(cfg: TrainConfig, rank: int, world_size: int, start_batch: int) -> LatentPairStream:
    return LatentPairStream(
        cfg.data,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        start_batch=start_batch,
        caption_dropout=cfg.caption_dropout,
        shards_in_flight=cfg.shards_in_flight,
    )
