"""schemas/sample.py: the one tar reader agrees with WebDataset's own, and the naming rules of the format."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
from webdataset.tariterators import group_by_keys, tar_file_expander

from schemas.sample import (
    latent_tensor_names,
    model_family,
    read_tar,
    split_member_name,
    tensor_name,
    write_tar,
)

SAMPLES = [
    {"__key__": "00000000000000000001", "json": b'{"a": 1}', "safetensors": b"x" * 700},
    {"__key__": "shard/n00000000000000000002", "json": b"{}", "seg.png": b"\x89PNG", "safetensors": b""},
    {"__key__": "00000000000000000003", "safetensors": b"y" * 513},
]


def webdataset_samples(path: Path) -> list[dict]:
    """WebDataset's reader, the oracle: what a WebDataset pipeline would see in the tar."""
    with open(path, "rb") as stream:
        return list(group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])))


def test_read_tar_agrees_with_webdataset(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    write_tar(path, SAMPLES)
    ours = list(read_tar(path, read=("json", "safetensors", "seg.png")))
    theirs = webdataset_samples(path)
    assert [s.key for s in ours] == [s["__key__"] for s in theirs]
    for mine, ref in zip(ours, theirs, strict=True):
        assert mine.data == {k: v for k, v in ref.items() if not k.startswith("__")}
        assert mine.where == f"{path}:{mine.key}"
        raw = path.read_bytes()  # the spans are where the data sits in the file (the text store preads them)
        assert all(raw[off : off + size] == mine.data[ext] for ext, (off, size) in mine.spans.items())


def test_read_tar_reads_only_what_is_asked(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    write_tar(path, SAMPLES)
    (first, second, _) = read_tar(path, read=("json",))
    assert set(first.data) == {"json"} and set(first.spans) == {"json", "safetensors"}
    assert set(second.spans) == {"json", "seg.png", "safetensors"}
    assert split_member_name("a.b/c.d.e") == ("a.b/c", "d.e")


def test_read_tar_names_the_tar_and_the_sample(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    write_tar(path, SAMPLES)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(path.read_bytes()[:700])
    with pytest.raises(ValueError, match=rf"{truncated}: unreadable tar"):
        list(read_tar(truncated, read=("safetensors",)))
    twice = tmp_path / "twice.tar"
    with tarfile.open(twice, "w") as tar:
        for name in ("k1.json", "k1.json"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ValueError, match=rf"{twice}:k1: member .json occurs twice"):
        list(read_tar(twice))


def test_tensor_names_and_model_family(tmp_path: Path, tiny_sd15: Path, tiny_sdxl: Path) -> None:
    assert tensor_name("w", "mean") == "w_mean" and tensor_name("l", "logvar", True) == "l_logvar_flip"
    assert latent_tensor_names("mean", True) == ["w_mean", "l_mean", "w_mean_flip", "l_mean_flip"]
    assert model_family(tiny_sd15) == "sd15" and model_family(tiny_sdxl) == "sdxl"
    assert model_family(tmp_path) == "sd15"
    shutil.copytree(tiny_sdxl / "unet", tmp_path / "unet_only" / "unet")  # the trainer needs only the UNet
    assert model_family(tmp_path / "unet_only") == "sdxl"
