"""Every input format through the real encode CLI on real files, with the winner/loser order checked by content:
preferred images are red, the others blue, so each stored `w_mean` must be the VAE encoding of red. Pick-a-Pic's
own format is checked so by test_fidelity_encode (every stored w moment is the preferred image's, by label_0) on
the zoo encodes, and its ties and drops by test_encode."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load as load_safetensors

from schemas.manifest import Manifest, Report
from schemas.sample import PairMeta, caption_key
from stages.encode import main
from stages.formats import get_format, stable_id
from tests.test_encode import FAST, encode, read_samples

RED, BLUE = (220, 20, 20), (20, 20, 220)
ROWS = 10  # per source; row 3 is a tie (dropped), odd rows put the preferred image second where a layout can


def image(colour: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 64), colour).save(buf, fmt)
    return buf.getvalue()


def labelled_rows() -> list[dict]:
    """Pick-a-Pic-style rows: label 1 → image 0 preferred, 0 → image 1, 0.5 → tie."""
    rows = []
    for i in range(ROWS):
        label = 0.5 if i == 3 else float(i % 2 == 0)
        first, second = (RED, BLUE) if label == 1.0 else (BLUE, RED)
        rows.append(
            {"caption": f"a red thing {i}", "img0": image(first), "img1": image(second), "label": label}
        )
    return rows


def write_preference_hub(root: Path) -> str:
    """The `datasets` hub layout: data/train-0000K-of-00002.parquet, prompt + chosen/rejected as
    struct<bytes, path>; half the cells carry bytes, the others only a path relative to the parquet file."""
    data = root / "data"
    (data / "images").mkdir(parents=True)
    (root / "README.md").write_text("---\nlicense: mit\n---\n")
    rows = []
    for i in range(ROWS):
        cells = {}
        for role, colour in (("chosen", RED), ("rejected", BLUE)):
            if i % 2:
                (data / "images" / f"{i}_{role}.png").write_bytes(image(colour))
                cells[role] = {"bytes": None, "path": f"images/{i}_{role}.png"}
            else:
                cells[role] = {"bytes": image(colour, "JPEG"), "path": None}
        rows.append({"prompt": f"a red thing {i}", **cells})
    pq.write_table(pa.Table.from_pylist(rows[:6]), data / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[6:]), data / "train-00001-of-00002.parquet")
    return str(root)


def write_preference_labelled(root: Path) -> str:
    rows = [
        {"text": r["caption"], "a": r["img0"], "b": r["img1"], "pref": r["label"], "pair": 7000 + i}
        for i, r in enumerate(labelled_rows())
    ]
    root.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "pairs.parquet")
    return str(root)


def write_webdataset(root: Path) -> str:
    """Two shards as a Pick-a-Pic mirror stores them; the second shard's samples carry no ranking_id."""
    root.mkdir(parents=True)
    for shard, rows in enumerate((labelled_rows()[:5], labelled_rows()[5:])):
        with tarfile.open(root / f"pairs-{shard:03d}.tar", "w") as tar:
            for i, r in enumerate(rows):
                meta = {"caption": r["caption"], "label_0": r["label"]}
                if shard == 0:
                    meta["ranking_id"] = 500 + i
                key = f"s{shard}_{i:04d}"
                for ext, data in (
                    ("jpg_0", r["img0"]),
                    ("jpg_1", r["img1"]),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{root}/pairs-{{000..001}}.tar"


SOURCES = {
    "preference": (write_preference_hub, []),
    "preference-labelled": (
        write_preference_labelled,
        ["--columns", "caption=text,image_0=a,image_1=b,label_0=pref,id=pair"],
    ),
    "webdataset": (write_webdataset, []),
}


@pytest.fixture(scope="module")
def colour_latents(tiny_sd15: Path) -> dict[str, torch.Tensor]:
    """The tiny VAE's posterior means of a solid red and a solid blue 64 px image, computed here with diffusers."""
    vae = AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae").eval()
    out = {}
    for name, colour in (("red", RED), ("blue", BLUE)):
        x = torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 64, 64) / 127.5 - 1.0
        with torch.no_grad():
            out[name] = vae.encode(x).latent_dist.mean[0]
    return out


def check_winners_are_red(out: Path, colour_latents: dict[str, torch.Tensor]) -> list[PairMeta]:
    metas = []
    for sample in read_samples(out).values():
        tensors = load_safetensors(sample["safetensors"])
        for side, colour, other in (("w", "red", "blue"), ("l", "blue", "red")):
            mean = tensors[f"{side}_mean"].float()
            near, far = (mean - colour_latents[colour]).norm(), (mean - colour_latents[other]).norm()
            assert near < 0.05 * far, (side, float(near), float(far))
        metas.append(PairMeta.from_json_bytes(sample["json"]))
    return metas


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_format_through_the_cli_puts_the_preferred_image_first(
    source: str, tiny_sd15: Path, ray_cluster, colour_latents, tmp_path: Path
) -> None:
    write, extra = SOURCES[source]
    src = write(tmp_path / "src")
    fmt = source.split("-")[0]
    out = tmp_path / "out"
    args = ["--src", src, "--out", str(out), "--model", str(tiny_sd15), "--format", fmt, *extra, *FAST]
    r = encode([*args, "--ray-address", ray_cluster.address], ray_cluster)
    assert r.returncode == 0, r.stderr[-3000:]
    metas = check_winners_are_red(out, colour_latents)
    ties = 0 if source == "preference" else 1
    report = Report.load(out)
    assert report.rows_read == ROWS and report.rows_written == ROWS - ties == len(metas)
    assert report.dropped == ({"tie": 1} if ties else {})
    assert {m.caption_key for m in metas} <= {caption_key(f"a red thing {i}") for i in range(ROWS)}
    assert Manifest.load(out).num_samples == len(metas)
    if source == "preference-labelled":
        assert {m.ranking_id for m in metas} == {7000 + i for i in range(ROWS) if i != 3}


def test_stable_ids_follow_the_relative_path_not_the_location(tmp_path: Path) -> None:
    """Without an id column, ids come from (file relative to --src, row): a copy elsewhere keeps them."""
    a = write_preference_hub(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    ids = []
    for src in (a, str(b)):
        fmt = get_format("preference", src)
        ids.append([fmt.read_ids_labels_captions(f)["ranking_id"].to_pylist() for f in fmt.list_inputs()])
    assert ids[0] == ids[1]
    assert ids[0][1][0] == stable_id("data/train-00001-of-00002.parquet", 0)
    wds = get_format("webdataset", write_webdataset(tmp_path / "w"))
    scans = [wds.read_ids_labels_captions(f) for f in wds.list_inputs()]
    assert scans[0]["ranking_id"].to_pylist() == [500 + i for i in range(5)]
    assert scans[1]["ranking_id"].to_pylist()[0] == stable_id("pairs-001.tar", "s1_0000")


def _drop_column(src: str, column: str) -> Path:
    path = next(Path(src).rglob("*.parquet"))
    pq.write_table(pq.read_table(path).drop_columns([column]), path)
    return path


def _caption_as_int(src: str, column: str) -> Path:
    path = next(Path(src).rglob("*.parquet"))
    table = pq.read_table(path)
    pq.write_table(
        table.set_column(table.schema.get_field_index(column), column, pa.array(range(len(table)))), path
    )
    return path


def _drop_member(src: str, ext: str) -> Path:
    path = Path(src.replace("{000..001}", "001"))
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if not m.name.endswith(f".{ext}") or not m.name.startswith("s1_0002"):
                tar.addfile(m, io.BytesIO(data))
    return path


BROKEN = {  # source, how it is broken, what the message must name besides the file
    "preference-missing": ("preference", lambda s: _drop_column(s, "rejected"), "'rejected'"),
    "preference-type": ("preference", lambda s: _caption_as_int(s, "prompt"), "'prompt'"),
    "labelled-unmapped": ("preference-labelled", lambda s: _drop_column(s, "pref"), "label_0=NAME"),
    "webdataset-member": ("webdataset", lambda s: _drop_member(s, "jpg_1"), ".jpg_1"),
    "webdataset-json": ("webdataset", lambda s: _drop_member(s, "json"), ".json"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_input_that_does_not_fit_is_exit_2_naming_file_and_column(
    case: str, tiny_sd15: Path, tmp_path: Path, capsys
) -> None:
    source, breaker, named = BROKEN[case]
    write, extra = SOURCES[source]
    src = write(tmp_path / "src")
    bad = breaker(src)
    out = tmp_path / "out"
    rc = main(
        ["--src", src, "--out", str(out), "--model", str(tiny_sd15), "--format", source.split("-")[0], *extra]
    )
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and named in err, err
    assert not out.exists()
