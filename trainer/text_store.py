"""Random access to caption embeddings stored as WebDataset tars, keyed by `caption_key`.

The text tars can be several GiB, so no process loads them: one scan of the tar headers gives each member's byte
range, and members are read on demand. Local tars are read with `os.pread`: the OS page cache is then the only
copy, shared by every rank and DataLoader worker on the machine. Tars on object storage (s3://, any fsspec URL) are
read with one ranged GET per member, behind a bounded per-process cache of raw members (`cache_bytes`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch

from schemas import storage
from schemas.manifest import Manifest
from schemas.sample import TENSORS_EXT, decode_tensors, read_tar, text_tensor_names


class TextEmbeddingStore:
    """`get(caption_key)` → {"prompt_embeds": [77, D] (+ "pooled_prompt_embeds": [P] for SDXL)}, in the stored
    dtype (fp16): the collator casts the stacked batch once."""

    def __init__(self, data_dir: str | Path, manifest: Manifest, cache_bytes: int = 256 * 2**20) -> None:
        self.data_dir = storage.local_path(data_dir)
        self.remote = storage.is_remote(self.data_dir)
        self.paths = [storage.join(self.data_dir, s.path) for s in manifest.text_shards]
        self.required = text_tensor_names(manifest.pooled_embed_dim is not None)
        self.embed_shape = tuple(manifest.text_embed_shape)
        self.empty_key = manifest.empty_caption_key
        # key -> (index into self.paths, byte offset of the member's data, size in bytes); nothing else is held
        self.index: dict[str, tuple[int, int, int]] = {}
        for i, path in enumerate(self.paths):
            for sample in read_tar(path):
                if TENSORS_EXT in sample.spans:
                    self.index[sample.key] = (i, *sample.spans[TENSORS_EXT])
        if self.empty_key not in self.index:
            raise ValueError(f"{self.data_dir}: text tars lack the empty-caption embedding {self.empty_key}")
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._empty: dict[str, torch.Tensor] | None = None
        self.cache_bytes = cache_bytes
        # remote members, least recently used first
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        """File descriptors belong to one process; a pickled copy (spawned worker) opens its own."""
        return {**self.__dict__, "_fds": {}, "_pid": None, "_cache": OrderedDict(), "_cached": 0}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)

    def _fd(self, i: int) -> int:
        # forked: the parent's descriptors are not ours to share or close
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if i not in self._fds:
            self._fds[i] = os.open(self.paths[i], os.O_RDONLY)
        return self._fds[i]

    def get(self, caption_key: str) -> dict[str, torch.Tensor]:
        try:
            i, offset, size = self.index[caption_key]
        except KeyError:
            raise KeyError(
                f"caption key {caption_key!r} not in the text embeddings of {self.data_dir}"
            ) from None
        where = f"{self.paths[i]}:{caption_key}"
        data = (
            self._read_remote(caption_key, i, offset, size)
            if self.remote
            else os.pread(self._fd(i), size, offset)
        )
        if len(data) != size:
            raise ValueError(f"{where}: truncated member ({len(data)} of {size} bytes)")
        tensors = decode_tensors(data, self.required, where, require_checksum=True)
        if tuple(tensors["prompt_embeds"].shape) != self.embed_shape:
            raise ValueError(
                f"{where}: prompt_embeds shape {list(tensors['prompt_embeds'].shape)}, "
                f"manifest says {list(self.embed_shape)}"
            )
        return {name: tensors[name] for name in self.required}

    def _read_remote(self, key: str, i: int, offset: int, size: int) -> bytes:
        data = self._cache.get(key)
        if data is not None:
            self._cache.move_to_end(key)
            return data
        data = storage.read_range(self.paths[i], offset, size)
        self._cache[key] = data
        self._cached += len(data)
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            self._cached -= len(self._cache.popitem(last=False)[1])
        return data

    def empty(self) -> dict[str, torch.Tensor]:
        """The empty-caption embedding, used for caption dropout; decoded once per process."""
        if self._empty is None:
            self._empty = self.get(self.empty_key)
        return self._empty
