"""Damaged bytes on disk: one flipped byte inside a stored tensor, a pair's JSON or a caption embedding is an error
naming the shard and key; an encode output without checksums is refused, before any work."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from embedded.latent_dataset import write_latent_dataset
from schemas.errors import InputError
from schemas.manifest import Manifest
from schemas.sample import CorruptSampleError
from tests.fixtures.damage import flip_byte
from trainer.data import LatentPairStream, iter_eval_batches
from trainer.model import check_data_fits_model


@pytest.mark.parametrize(("member", "what"), [(".safetensors", "tensor data"), (".json", "JSON member")])
def test_flipped_byte_in_a_pair_names_shard_and_key(tmp_path: Path, member: str, what: str) -> None:
    data = write_latent_dataset(tmp_path / "d", num_pairs=8, shard_size=4)
    shard = data / Manifest.load(data).shards[1].path
    key = flip_byte(shard, member, nth=2, back=3 if member == ".json" else 5)
    message = rf"{shard}:{key}: {what} fails its checksum"
    with pytest.raises(CorruptSampleError, match=message):
        list(iter_eval_batches(data, batch_size=4))
    with pytest.raises(CorruptSampleError, match=message):
        list(zip(range(4), LatentPairStream(data, batch_size=4, seed=0), strict=False))


def test_flipped_byte_in_a_caption_embedding_names_shard_and_key(tmp_path: Path) -> None:
    data = write_latent_dataset(tmp_path / "d", num_pairs=8, shard_size=4, num_captions=2, text_shard_size=8)
    shard = data / Manifest.load(data).text_shards[0].path
    key = flip_byte(shard, ".safetensors", nth=0)
    with pytest.raises(CorruptSampleError, match=rf"{shard}:{key}: tensor data fails its checksum"):
        list(iter_eval_batches(data, batch_size=4))


def test_an_encode_without_checksums_is_refused(tmp_path: Path) -> None:
    """Damage could not be detected in it: the trainer's preflight (exit 2 naming the flag) and every reader say so."""
    data = write_latent_dataset(tmp_path / "d", num_pairs=8, shard_size=4)
    assert len(list(iter_eval_batches(data, batch_size=4))) == 2
    dataclasses.replace(Manifest.load(data), checksum=None).save(data)
    message = re.escape(f"{data}/manifest.json: encoded without per-sample crc32 checksums")
    with pytest.raises(InputError, match=f"--data {re.escape(str(data))}: {message}"):
        check_data_fits_model(str(data), "--data", "unread-model")
    with pytest.raises(ValueError, match=message):
        list(iter_eval_batches(data, batch_size=4))
    with pytest.raises(ValueError, match=message):
        LatentPairStream(data, batch_size=4, seed=0)
