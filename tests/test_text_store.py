"""TextEmbeddingStore: random access by caption key over text tars, without loading them."""

from __future__ import annotations

import copy
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from torch.utils.data import DataLoader, Dataset

from embedded.latent_dataset import write_latent_dataset
from schemas.manifest import Manifest
from schemas.sample import EMPTY_CAPTION, caption_key, write_tar
from trainer.text_store import TextEmbeddingStore


def stored_text(data_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Ground truth, read with tarfile rather than the code under test."""
    out = {}
    for shard in Manifest.load(data_dir).text_shards:
        with tarfile.open(data_dir / shard.path) as tar:
            for member in tar:
                out[member.name.split(".")[0]] = load_safetensors(tar.extractfile(member).read())
    return out


@pytest.mark.parametrize("fixture", ["latent_sd15", "latent_sdxl"])
def test_get_returns_every_stored_embedding_as_stored(fixture: str, request: pytest.FixtureRequest) -> None:
    data_dir = request.getfixturevalue(fixture)
    manifest = Manifest.load(data_dir)
    store = TextEmbeddingStore(data_dir, manifest)
    truth = stored_text(data_dir)
    assert len(manifest.text_shards) > 1 and len(store) == len(truth) == manifest.num_text_samples
    for key in reversed(sorted(truth)):  # out of file order: random access
        got = store.get(key)
        assert set(got) == set(truth[key])
        for name, tensor in got.items():
            assert tensor.dtype == truth[key][name].dtype == torch.float16
            assert torch.equal(tensor, truth[key][name])
    assert torch.equal(store.empty()["prompt_embeds"], truth[caption_key(EMPTY_CAPTION)]["prompt_embeds"])


def test_unknown_key_names_key_and_directory(latent_sd15: Path) -> None:
    store = TextEmbeddingStore(latent_sd15, Manifest.load(latent_sd15))
    with pytest.raises(KeyError, match=rf"nope.*{latent_sd15}"):
        store.get("nope")


def test_index_holds_byte_ranges_only(latent_sd15: Path) -> None:
    store = TextEmbeddingStore(latent_sd15, Manifest.load(latent_sd15))
    for key, entry in store.index.items():
        assert len(entry) == 3 and all(type(x) is int for x in entry)
        file_index, offset, size = entry
        with open(store.paths[file_index], "rb") as f:
            f.seek(offset)
            assert load_safetensors(f.read(size))["prompt_embeds"].shape == (77, 32), key
    assert not any(isinstance(v, bytes | bytearray | torch.Tensor) for v in vars(store).values())


class _Lookup(Dataset):
    def __init__(self, store: TextEmbeddingStore, keys: list[str]) -> None:
        self.store, self.keys = store, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.store.get(self.keys[i])["prompt_embeds"]


def test_works_in_forked_workers_after_parent_reads(latent_sd15: Path) -> None:
    store = TextEmbeddingStore(latent_sd15, Manifest.load(latent_sd15))
    keys = sorted(store.index)
    expected = [store.get(k)["prompt_embeds"] for k in keys]  # the parent opens descriptors before forking
    loader = DataLoader(_Lookup(store, keys), batch_size=None, num_workers=2, multiprocessing_context="fork")
    for got, want in zip(loader, expected, strict=True):
        assert torch.equal(got, want)
    clone = copy.deepcopy(store)  # what pickling for a spawned worker does: no descriptors carried over
    assert clone._fds == {} and torch.equal(clone.get(keys[0])["prompt_embeds"], expected[0])


def test_corrupt_member_names_file_and_key(tmp_path: Path) -> None:
    data_dir = write_latent_dataset(tmp_path / "d", num_pairs=4, num_captions=4)  # empty caption in shard 1
    manifest = Manifest.load(data_dir)
    path = data_dir / manifest.text_shards[0].path
    with tarfile.open(path) as tar:
        first = tar.getnames()[0]
    key = first.split(".")[0]
    write_tar(path, [{"__key__": key, "safetensors": b"\x00" * 64}])
    store = TextEmbeddingStore(data_dir, manifest)
    with pytest.raises(ValueError, match=rf"{path}:{key}"):
        store.get(key)
