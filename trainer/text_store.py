"""Random access to caption embeddings stored as WebDataset tars, keyed by `caption_key`.

The text tars can be several GiB, so no process loads them: one scan of the tar headers gives each member's byte
range, and members are read with `os.pread` on demand. The OS page cache is then the only copy, shared by every
rank and DataLoader worker on the machine.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import torch
from webdataset.tariterators import base_plus_ext

from schemas.manifest import Manifest
from schemas.sample import TENSORS_EXT, decode_tensors, text_tensor_names


class TextEmbeddingStore:
    """`get(caption_key)` → {"prompt_embeds": [77, D] (+ "pooled_prompt_embeds": [P] for SDXL)}, in the stored
    dtype (fp16): the collator casts the stacked batch once."""

    def __init__(self, data_dir: str | Path, manifest: Manifest) -> None:
        self.data_dir = Path(data_dir)
        self.paths = [self.data_dir / s.path for s in manifest.text_shards]
        self.required = text_tensor_names(manifest.pooled_embed_dim is not None)
        self.embed_shape = tuple(manifest.text_embed_shape)
        self.empty_key = manifest.empty_caption_key
        self.verified = manifest.checksum is not None
        # key -> (index into self.paths, byte offset of the member's data, size in bytes); nothing else is held
        self.index: dict[str, tuple[int, int, int]] = {}
        for i, path in enumerate(self.paths):
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    key, ext = base_plus_ext(member.name)
                    if member.isreg() and ext == TENSORS_EXT:
                        self.index[key] = (i, member.offset_data, member.size)
        if self.empty_key not in self.index:
            raise ValueError(f"{self.data_dir}: text tars lack the empty-caption embedding {self.empty_key}")
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._empty: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        """File descriptors belong to one process; a pickled copy (spawned worker) opens its own."""
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)

    def _fd(self, i: int) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors are not ours to share or close
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
        data = os.pread(self._fd(i), size, offset)
        if len(data) != size:
            raise ValueError(f"{where}: truncated member ({len(data)} of {size} bytes)")
        tensors = decode_tensors(data, self.required, where, require_checksum=self.verified)
        if tuple(tensors["prompt_embeds"].shape) != self.embed_shape:
            raise ValueError(
                f"{where}: prompt_embeds shape {list(tensors['prompt_embeds'].shape)}, "
                f"manifest says {list(self.embed_shape)}"
            )
        return {name: tensors[name] for name in self.required}

    def empty(self) -> dict[str, torch.Tensor]:
        """The empty-caption embedding, used for caption dropout; decoded once per process."""
        if self._empty is None:
            self._empty = self.get(self.empty_key)
        return self._empty
