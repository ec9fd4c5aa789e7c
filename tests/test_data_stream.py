"""LatentPairStream: exact O(1) resume, rank/worker sharding, per-sample randomness and strict reading."""

from __future__ import annotations

import dataclasses
import sys
import tarfile
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from embedded.latent_dataset import write_latent_dataset
from schemas.manifest import Manifest
from schemas.sample import PairMeta, encode_tensors, write_tar
from trainer.data import LatentPairStream, iter_eval_batches, make_loader

TENSOR_KEYS = (
    "w_latents",
    "l_latents",
    "prompt_embeds",
    "pooled_prompt_embeds",
    "w_time_ids",
    "l_time_ids",
    "label",
)

_opened: list[str] | None = None  # paths passed to open() while a test records them


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], str | Path):
        _opened.append(str(args[0]))


sys.addaudithook(_audit)


def opened_pair_tars(fn) -> list[str]:
    """Run fn in this process and return the pair tars it opened (audit events, so no code is patched)."""
    global _opened
    _opened = []
    try:
        fn()
        return [p for p in _opened if "/pairs/" in p and p.endswith(".tar")]
    finally:
        _opened = None


def take(stream: LatentPairStream, n: int) -> list[dict]:
    return list(islice(iter(make_loader(stream)), n))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["keys"] == y["keys"]
        assert set(x) == set(y)
        for k in TENSOR_KEYS:
            if k in x:
                assert torch.equal(x[k], y[k]), k


def stored_pairs(data_dir: Path) -> dict[str, tuple[PairMeta, dict[str, torch.Tensor]]]:
    """Ground truth read with tarfile, independent of the code under test."""
    raw: dict[str, dict[str, bytes]] = {}
    for shard in Manifest.load(data_dir).shards:
        with tarfile.open(data_dir / shard.path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                raw.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return {
        k: (PairMeta.from_json_bytes(v["json"]), load_safetensors(v["safetensors"])) for k, v in raw.items()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 pairs in 8 shards of 4, so 2 ranks × 2 workers each own 2 shards per epoch."""
    return write_latent_dataset(tmp_path_factory.mktemp("small"), num_pairs=32, shard_size=4, seed=1)


@pytest.mark.parametrize(("num_workers", "world_size"), [(0, 1), (1, 1), (2, 1), (0, 2), (2, 2)])
def test_resume_equals_uninterrupted(latent_sd15: Path, num_workers: int, world_size: int) -> None:
    def stream(rank: int, start: int) -> LatentPairStream:
        return LatentPairStream(
            latent_sd15,
            batch_size=3,
            seed=7,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            start_batch=start,
            caption_dropout=0.5,
            shards_in_flight=2,
        )

    rank = world_size - 1
    full = take(stream(rank, 0), 30)  # 90 samples: crosses epochs of the 40-pair set
    for k in (1, 5, 26):
        assert_same_batches(take(stream(rank, k), 4), full[k : k + 4])


def test_ranks_disjoint_and_epoch_window_covers_each_sample_once(small: Path) -> None:
    keys = []
    for rank in (0, 1):
        stream = LatentPairStream(
            small, batch_size=4, seed=0, rank=rank, world_size=2, num_workers=2, shards_in_flight=2
        )
        keys.append([k for b in take(stream, 4) for k in b["keys"]])  # 4 batches × 4 = 16 = 2 shards/slot
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(stored_pairs(small))


def test_more_slots_than_shards_still_yields(tmp_path: Path) -> None:
    data_dir = write_latent_dataset(tmp_path / "d", num_pairs=10, shard_size=5)  # 2 shards, 4 slots
    for rank in (0, 1):
        stream = LatentPairStream(data_dir, batch_size=4, seed=0, rank=rank, world_size=2, num_workers=2)
        batches = take(stream, 6)
        assert len(batches) == 6 and all(len(b["keys"]) == 4 for b in batches)


def test_deterministic_for_a_seed_and_different_across_seeds(latent_sd15: Path) -> None:
    def keys(seed: int) -> list[list[str]]:
        return [b["keys"] for b in take(LatentPairStream(latent_sd15, batch_size=4, seed=seed), 5)]

    run_a = take(LatentPairStream(latent_sd15, batch_size=4, seed=3), 5)
    assert_same_batches(run_a, take(LatentPairStream(latent_sd15, batch_size=4, seed=3), 5))
    assert keys(3) != keys(4)


def test_groups_mix_samples_across_shards(latent_sd15: Path) -> None:
    shard_of = {key: i // 8 for i, key in enumerate(stored_pairs(latent_sd15))}  # fixture: 8 pairs per shard
    batch = take(LatentPairStream(latent_sd15, batch_size=8, seed=0, shards_in_flight=4), 1)[0]
    assert len({shard_of[k] for k in batch["keys"]}) > 1


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_caption_dropout_rate_uses_the_empty_embedding(latent_sdxl: Path, rate: float) -> None:
    stream = LatentPairStream(latent_sdxl, batch_size=20, seed=0, caption_dropout=rate)
    empty = stream.collate.text.empty()
    batches = take(stream, 10)
    embeds = torch.cat([b["prompt_embeds"] for b in batches])
    pooled = torch.cat([b["pooled_prompt_embeds"] for b in batches])
    is_empty = (embeds == empty["prompt_embeds"]).flatten(1).all(1)
    assert torch.equal(is_empty, (pooled == empty["pooled_prompt_embeds"]).all(1))  # dropped together
    assert abs(is_empty.float().mean().item() - rate) < 0.08
    if 0 < rate < 1:  # fresh draws per batch, not one mask repeated
        assert len({tuple(m.tolist()) for m in is_empty.view(10, 20)}) > 1


@pytest.mark.parametrize("random_flip", [True, False])
def test_flip_uses_flip_latents_and_flip_crops(latent_sdxl: Path, random_flip: bool) -> None:
    truth = stored_pairs(latent_sdxl)
    manifest = Manifest.load(latent_sdxl)
    stream = LatentPairStream(
        latent_sdxl, batch_size=10, seed=0, random_flip=random_flip, sample_latents=False
    )
    flips = []
    for batch in take(stream, 4):
        for i, key in enumerate(batch["keys"]):
            meta, tensors = truth[key]
            flipped = torch.equal(batch["w_latents"][i], tensors["w_mean_flip"].float() * 0.13025)
            plain = torch.equal(batch["w_latents"][i], tensors["w_mean"].float() * 0.13025)
            assert flipped != plain
            view = "_flip" if flipped else ""
            assert torch.equal(batch["l_latents"][i], tensors[f"l_mean{view}"].float() * 0.13025)
            for side, image in (("w", meta.w), ("l", meta.l)):
                crop = image.crop_top_left_flip if flipped else image.crop_top_left
                r = manifest.resolution
                assert batch[f"{side}_time_ids"][i].tolist() == [*image.original_size, *crop, r, r]
            flips.append(flipped)
    assert (0 < sum(flips) < len(flips)) if random_flip else not any(flips)


def test_sampling_uses_logvar(latent_sd15: Path) -> None:
    truth = stored_pairs(latent_sd15)
    batch = take(LatentPairStream(latent_sd15, batch_size=40, seed=0, random_flip=False), 1)[0]
    z = []
    for i, key in enumerate(batch["keys"]):
        t = truth[key][1]
        z.append(
            (batch["w_latents"][i] / 0.18215 - t["w_mean"].float()) / torch.exp(0.5 * t["w_logvar"].float())
        )
    z = torch.stack(z)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05  # eps ~ N(0, 1) only if std used
    assert "pooled_prompt_embeds" not in batch and "w_time_ids" not in batch  # SD1.5 has neither


def test_mean_mode_and_shift_factor(tmp_path: Path) -> None:
    data_dir = write_latent_dataset(tmp_path / "d", num_pairs=8, latent_mode="mean", flip=False)
    manifest = Manifest.load(data_dir)
    dataclasses.replace(manifest, vae_shift_factor=0.25).save(data_dir)
    truth = stored_pairs(data_dir)
    batch = take(LatentPairStream(data_dir, batch_size=8, seed=0), 1)[0]
    for i, key in enumerate(batch["keys"]):
        assert torch.equal(batch["l_latents"][i], (truth[key][1]["l_mean"].float() - 0.25) * 0.18215)


def test_tie_label_is_half(tmp_path: Path) -> None:
    data_dir = write_latent_dataset(tmp_path / "d", num_pairs=12, tie_every=3)
    truth = stored_pairs(data_dir)
    labels = {
        k: float(lbl)
        for b in iter_eval_batches(data_dir, batch_size=5)
        for k, lbl in zip(b["keys"], b["label"], strict=True)
    }
    assert labels == {k: 0.5 if meta.label_0 == 0.5 else 1.0 for k, (meta, _) in truth.items()}
    assert sorted(labels.values()).count(0.5) == 4


def test_eval_batches_every_pair_once_in_order_means_only(latent_sd15: Path) -> None:
    truth = stored_pairs(latent_sd15)
    batches = list(iter_eval_batches(latent_sd15, batch_size=7))
    assert [len(b["keys"]) for b in batches] == [7, 7, 7, 7, 7, 5]
    assert [k for b in batches for k in b["keys"]] == list(truth)
    first = batches[0]
    assert torch.equal(first["w_latents"][0], truth[first["keys"][0]][1]["w_mean"].float() * 0.18215)
    assert [k for b in iter_eval_batches(latent_sd15, batch_size=7, max_pairs=10) for k in b["keys"]] == list(
        truth
    )[:10]


def _rewrite_first_pair(data_dir: Path, mutate) -> tuple[Path, str]:
    """Replace shard 0's first sample by mutate(sample); return the shard path and key."""
    path = data_dir / Manifest.load(data_dir).shards[0].path
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    first = next(iter(samples))
    samples[first] = mutate(samples[first])
    write_tar(path, list(samples.values()))
    return path, first


def _without_logvar(sample: dict) -> dict:
    tensors = load_safetensors(sample["safetensors"])
    del tensors["w_logvar"]
    return {**sample, "safetensors": encode_tensors(tensors, companion=sample["json"])}


def _unparsable_json(sample: dict) -> dict:
    """Metadata that is not JSON, written with matching checksums: the parser, not the checksum, must catch it."""
    meta = b"{not json"
    tensors = load_safetensors(sample["safetensors"])
    return {**sample, "json": meta, "safetensors": encode_tensors(tensors, companion=meta)}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: {**s, "safetensors": b"garbage"}, "unreadable safetensors"),
        (_without_logvar, r"lacks tensors \['w_logvar'\]"),
        (_unparsable_json, "malformed pair metadata"),
        (lambda s: {**s, "json": b"{not json"}, "JSON member fails its checksum"),
        (lambda s: {**s, "safetensors": encode_tensors(load_safetensors(s["safetensors"]))}, "no crc32_json"),
        (lambda s: {k: v for k, v in s.items() if k != "json"}, r"lacks members \['json'\]"),
    ],
)
def test_bad_member_names_shard_and_key(tmp_path: Path, mutate, message: str) -> None:
    data_dir = write_latent_dataset(tmp_path / "d", num_pairs=8, shard_size=4)
    path, key = _rewrite_first_pair(data_dir, mutate)
    with pytest.raises(ValueError, match=rf"{path}:{key}.*{message}"):
        list(iter_eval_batches(data_dir, batch_size=4))
    with pytest.raises(ValueError, match=rf"{path}:{key}.*{message}"):
        take(LatentPairStream(data_dir, batch_size=8, seed=0), 1)


@pytest.mark.parametrize("keep", [0, 1000, -700])
def test_damaged_tar_names_the_shard(tmp_path: Path, keep: int) -> None:
    """Empty, cut inside the first member, or short by its last members: each stops with the shard named."""
    data_dir = write_latent_dataset(tmp_path / "d", num_pairs=8, shard_size=4)
    path = data_dir / Manifest.load(data_dir).shards[0].path
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[: len(data) // 2 + keep])
    with pytest.raises(
        ValueError,
        match=rf"{path}(: unreadable tar|: \d+ samples, manifest says 4"
        r"|:\d+: pair sample lacks members)",
    ):
        list(iter_eval_batches(data_dir, batch_size=4))


def test_extra_members_are_ignored(tmp_path: Path) -> None:
    data_dir = write_latent_dataset(tmp_path / "d", num_pairs=8, shard_size=4)
    truth = stored_pairs(data_dir)
    _rewrite_first_pair(data_dir, lambda s: {**s, "pyd": b"\x80\x04not read"})
    keys = [k for b in iter_eval_batches(data_dir, batch_size=8) for k in b["keys"]]
    assert keys == list(truth)


def test_unlisted_tar_is_never_read(tmp_path: Path) -> None:
    data_dir = write_latent_dataset(tmp_path / "d", num_pairs=16, shard_size=4)
    stray = data_dir / "pairs" / "pairs-000099.tar"  # e.g. left by a killed encode
    stray.write_bytes(b"not a tar at all")
    opened = opened_pair_tars(lambda: take(LatentPairStream(data_dir, batch_size=4, seed=0), 12))  # 3 epochs
    assert opened and str(stray) not in opened


def _stream_iter(data_dir: Path, start: int) -> Iterator[dict]:
    return iter(LatentPairStream(data_dir, batch_size=2, seed=0, start_batch=start, shards_in_flight=2))


def test_huge_start_batch_opens_only_the_landing_group(latent_sd15: Path) -> None:
    batch: list[dict] = []
    opened = opened_pair_tars(lambda: batch.append(next(_stream_iter(latent_sd15, 1_000_000))))
    assert len(opened) == 2 and len(batch[0]["keys"]) == 2  # shards_in_flight tars, nothing before them
    # and the landing point is right: a moderate skip matches walking the stream
    walked = list(islice(_stream_iter(latent_sd15, 0), 101))
    assert_same_batches([next(_stream_iter(latent_sd15, 100))], walked[100:])


def test_encoded_tensors_are_the_same_bytes_in_every_process() -> None:
    """safetensors writes its metadata from a Rust HashMap, ordered differently in each process; encode_tensors
    sorts the header, so fresh encodes are byte-identical. Each process encodes the same member."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from schemas.sample import encode_tensors, decode_tensors;"
        "t = {'w_mean': torch.arange(8.0).reshape(2, 4).half(), 'l_mean': torch.ones(2, 4).half()};"
        "b = encode_tensors(t, companion=b'{}'); decode_tensors(b, ['w_mean'], 'x', companion=b'{}',"
        " require_checksum=True); sys.stdout.write(b.hex())"
    )
    root = Path(__file__).resolve().parents[1]
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
        ).stdout
        for _ in range(4)
    }
    assert len(outputs) == 1
