"""python -m evaluation.score: one record per image and scorer, reruns score only what is missing, and a user's
mistake exits 2 with a message and writes nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation import layout, score, scorers
from evaluation.layout import IMAGES_FILE, SCORES_FILE
from evaluation.scorers.rule import Rule
from tests.fixtures.eval_folders import PAIRS

IMAGES = 2 * len(PAIRS)


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / SCORES_FILE).read_text().splitlines()]


def test_scores_every_image_once_per_scorer_and_reruns_only_the_missing(
    eval_folder: Path,
    tiny_pickscore: Path,
    open_clip_scorers: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    specs = ["rule", f"pickscore={tiny_pickscore}", f"hps={open_clip_scorers['v2.1']}"]
    assert (
        score.main(["--images", str(eval_folder), *[f"--scorer={s}" for s in specs], "--batch-size", "5"])
        == 0
    )
    records = layout.read_scores(eval_folder)
    assert len(records) == 3 * IMAGES
    assert {(r.scorer, r.version) for r in records} == {
        ("rule", "1"),
        ("pickscore", "PickScore_tiny"),
        ("hps", "v2.1"),
    }
    images = {(r.model, r.prompt_id, r.seed) for r in layout.read_images(eval_folder)}
    for name in ("rule", "pickscore", "hps"):
        assert {(r.model, r.prompt_id, r.seed) for r in records if r.scorer == name} == images
    assert {r.weights for r in records if r.scorer == "hps"} == {str(open_clip_scorers["v2.1"])}
    assert set(_lines(eval_folder)[0]) == {
        "model",
        "prompt_id",
        "seed",
        "scorer",
        "version",
        "score",
        "weights",
    }

    assert re.search(
        r"score rule: 100%.* 16/16 \[\d\d:\d\d<\d\d:\d\d", capsys.readouterr().err
    )  # progress, ETA
    before = (eval_folder / SCORES_FILE).read_bytes()
    assert score.main(["--images", str(eval_folder), *[f"--scorer={s}" for s in specs]]) == 0
    assert "all 16 images already scored" in capsys.readouterr().out
    assert (eval_folder / SCORES_FILE).read_bytes() == before  # a finished run is a no-op

    # lose the pickscore records of one model, as if a run had died before publishing them
    kept = [line for line in before.decode().splitlines() if not ('"pickscore"' in line and '"base"' in line)]
    (eval_folder / SCORES_FILE).write_text("".join(line + "\n" for line in kept))
    assert score.main(["--images", str(eval_folder), f"--scorer=pickscore={tiny_pickscore}"]) == 0
    assert f"{IMAGES // 2} of {IMAGES} images to score" in capsys.readouterr().out
    again = {r.key: r.score for r in layout.read_scores(eval_folder)}
    # the same scores, up to the rounding of other batch shapes (16 here, 5 in the first run)
    assert again == pytest.approx({r.key: r.score for r in records}, rel=1e-5, abs=1e-5)


def test_hps_versions_are_kept_apart(eval_folder: Path, open_clip_scorers: dict[str, Path]) -> None:
    for version in ("v2.0", "v2.1"):
        assert score.main(["--images", str(eval_folder), f"--scorer=hps={open_clip_scorers[version]}"]) == 0
    records = layout.read_scores(eval_folder)
    assert sorted({r.version for r in records}) == ["v2.0", "v2.1"]
    assert len(records) == 2 * IMAGES  # the second version is scored, not taken as done


class InterruptedRule(Rule):
    """The rule scorer, interrupted (Ctrl-C) while it scores its third batch."""

    calls = 0

    def score(self, images, prompts):
        InterruptedRule.calls += 1
        if InterruptedRule.calls == 3:
            raise KeyboardInterrupt
        return super().score(images, prompts)


def test_an_interrupted_run_keeps_what_it_scored(
    eval_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(scorers.SCORERS, "rule", InterruptedRule)
    assert score.main(["--images", str(eval_folder), "--scorer", "rule", "--batch-size", "3"]) == 130
    assert "the same command scores what is still missing" in capsys.readouterr().err
    assert len(layout.read_scores(eval_folder)) == 6  # the two batches scored before the interrupt
    monkeypatch.setitem(scorers.SCORERS, "rule", Rule)
    assert score.main(["--images", str(eval_folder), "--scorer", "rule"]) == 0
    assert f"{IMAGES - 6} of {IMAGES} images to score" in capsys.readouterr().out
    assert len(layout.read_scores(eval_folder)) == IMAGES


def test_publishing_merges_and_never_duplicates(tmp_path: Path) -> None:
    def rec(model: str, seed: int, value: float) -> layout.ScoreRecord:
        return layout.ScoreRecord(model, 0, seed, "rule", "1", value, "w")

    assert layout.publish_scores(tmp_path, [rec("a", 0, 1.0), rec("a", 1, 2.0)]) == 2
    assert (
        layout.publish_scores(tmp_path, [rec("a", 1, 9.0), rec("b", 0, 3.0)]) == 1
    )  # a's seed 1 is already there
    assert [(r.model, r.seed, r.score) for r in layout.read_scores(tmp_path)] == [
        ("a", 0, 1.0),
        ("a", 1, 2.0),
        ("b", 0, 3.0),
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # nothing left aside


def _write_images(out: Path, records: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / IMAGES_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize(
    ("case", "argv", "message"),
    [
        ("unknown scorer", ["--scorer", "pickscor"], "--scorer pickscor: unknown scorer 'pickscor'"),
        ("no images.jsonl", ["--scorer", "rule"], "images.jsonl: no such file"),
        ("image outside OUT", ["--scorer", "rule"], "'path' = '../base/0_0.png' is not valid"),
        ("missing PNG", ["--scorer", "rule"], "(base/9_0.png) does not exist"),
        ("bad batch size", ["--scorer", "rule", "--batch-size", "0"], "--batch-size 0"),
    ],
)
def test_cli_mistakes_exit_2_and_write_nothing(
    eval_folder: Path, case: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    good = {"model": "base", "prompt_id": 0, "prompt": "a red cube", "seed": 0, "path": "base/0_0.png"}
    if case == "no images.jsonl":
        (eval_folder / IMAGES_FILE).unlink()
    elif case == "image outside OUT":
        _write_images(eval_folder, [{**good, "path": "../base/0_0.png"}])
    elif case == "missing PNG":
        _write_images(eval_folder, [good, {**good, "prompt_id": 9, "path": "base/9_0.png"}])
    assert score.main(["--images", str(eval_folder), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (eval_folder / SCORES_FILE).exists()


def test_offline_hub_id_names_the_scorer_and_what_to_download(eval_folder: Path, tmp_path: Path) -> None:
    """A bare `--scorer pickscore` wants yuvalkirstain/PickScore_v1 from the hub; offline and not in the cache, the
    real CLI says so (exit 2, no traceback) before it writes anything."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "evaluation.score",
            "--images",
            str(eval_folder),
            "--scorer",
            "rule",
            "--scorer",
            "pickscore",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "--scorer pickscore" in done.stderr and "yuvalkirstain/PickScore_v1" in done.stderr
    assert "hf download yuvalkirstain/PickScore_v1" in done.stderr and "HF_HUB_OFFLINE is set" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (eval_folder / SCORES_FILE).exists()  # rule came first, but nothing runs before all resolve


def test_image_records_are_checked(tmp_path: Path) -> None:
    good = {"model": "base", "prompt_id": 0, "prompt": "p", "seed": 0, "path": "base/0_0.png"}
    _write_images(tmp_path, [good, {**good, "path": "base/other.png"}])
    with pytest.raises(ValueError, match="a second record for model, prompt_id, seed"):
        layout.read_images(tmp_path)
    _write_images(tmp_path, [{**good, "model": "../x"}])
    with pytest.raises(ValueError, match=r"'model' = '\.\./x' is not valid"):
        layout.read_images(tmp_path)
    _write_images(tmp_path, [good])
    assert layout.read_images(tmp_path) == [layout.ImageRecord("base", 0, "p", 0, "base/0_0.png")]
