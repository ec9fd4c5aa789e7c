"""python -m evaluation.compare: the win-rate arithmetic on hand-counted cases, the paired bootstrap, the JSON line,
and a user's mistake (unknown model, zero pairs) exiting 2 with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evaluation import compare, score
from evaluation.compare import paired_stats
from evaluation.layout import REPORT_FILE, SCORES_FILE, ScoreRecord, publish_scores
from tests.fixtures.eval_folders import PAIRS, RULE_OUTCOME


def test_win_rate_counts_ties_as_half() -> None:
    # pair by pair, b against a: win (2 > 1), tie, loss (1 < 3), win (5 > 4), tie
    s = paired_stats([1, 2, 3, 4, 5], [2, 2, 1, 5, 5])
    assert (s.n, s.wins, s.ties, s.losses) == (5, 2, 2, 1)
    assert s.win_rate == pytest.approx((2 + 0.5 * 2) / 5)
    assert s.win_rate_ties_as_losses == pytest.approx(2 / 5)
    assert (s.mean_a, s.mean_b) == (pytest.approx(3.0), pytest.approx(3.0))
    everything = paired_stats([0.1, 0.2, 0.3], [1.0, 1.0, 1.0])
    assert (everything.win_rate, everything.ci95) == (1.0, (1.0, 1.0))
    tied = paired_stats([7.0] * 4, [7.0] * 4)
    assert (tied.wins, tied.ties, tied.losses, tied.win_rate, tied.win_rate_ties_as_losses) == (
        0,
        4,
        0,
        0.5,
        0.0,
    )
    assert tied.ci95 == (0.5, 0.5)


def test_zero_pairs_is_an_error_not_one_half() -> None:
    with pytest.raises(ValueError, match="zero pairs"):
        paired_stats([], [])


def test_bootstrap_is_seeded_paired_and_narrows_with_more_pairs() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=400)
    b = a + 0.1 + rng.normal(scale=0.5, size=400)
    first, again = paired_stats(a, b, seed=3), paired_stats(a, b, seed=3)
    assert first.ci95 == again.ci95
    assert first.ci95 != paired_stats(a, b, seed=4).ci95
    low, high = first.ci95
    assert low < first.win_rate < high
    narrow = paired_stats(np.tile(a, 25), np.tile(b, 25), seed=3).ci95
    assert narrow[1] - narrow[0] < (high - low) / 3  # 25x the pairs: about a fifth of the width
    # paired: b = a + 0.01 wins every pair however spread the scores are
    assert paired_stats(a, a + 0.01).ci95 == (1.0, 1.0)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert compare.main([*argv, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1  # one JSON line, nothing else on stdout
    return json.loads(lines[0])


def test_rule_scores_of_a_known_folder(eval_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The eval folder's pairs were built to give tuned 6 wins, 1 tie and 1 loss by the rule (eval_folders.py)."""
    assert score.main(["--images", str(eval_folder), "--scorer", "rule"]) == 0
    capsys.readouterr()
    result = _run(capsys, "--images", str(eval_folder), "--a", "base", "--b", "tuned")
    rule = result["scorers"]["rule"]
    assert {k: rule[k] for k in RULE_OUTCOME} == RULE_OUTCOME
    assert rule["n"] == len(PAIRS) and rule["version"] == "1"
    assert rule["win_rate"] == pytest.approx(6.5 / 8) and rule["win_rate_ties_as_losses"] == pytest.approx(
        6 / 8
    )
    assert result["macro"] == {
        "win_rate": rule["win_rate"],
        "win_rate_ties_as_losses": rule["win_rate_ties_as_losses"],
    }
    assert {"a", "b", "scorers", "macro"} <= set(result) and (result["a"], result["b"]) == ("base", "tuned")
    assert set(rule) >= {"win_rate", "wins", "ties", "losses", "mean_a", "mean_b", "ci95"}
    assert (eval_folder / REPORT_FILE).is_file()
    swapped = _run(capsys, "--images", str(eval_folder), "--a", "tuned", "--b", "base")["scorers"]["rule"]
    assert (swapped["wins"], swapped["ties"], swapped["losses"]) == (1, 1, 6)


def _records(model: str, scorer: str, version: str, values: list[float]) -> list[ScoreRecord]:
    return [
        ScoreRecord(model, pid, seed, scorer, version, v, "w")
        for (pid, seed), v in zip(PAIRS, values, strict=False)
    ]


def test_macro_average_and_versions_that_do_not_compare(
    eval_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hand-made scores: hps v2.0 (b wins 8 of 8), hps v2.1 (b wins 2, ties 2, loses 4, over 8), and a pickscore that
    scored only model a, which has no pairs and is not reported."""
    publish_scores(
        eval_folder, _records("base", "hps", "v2.0", [0.2] * 8) + _records("tuned", "hps", "v2.0", [0.3] * 8)
    )
    base = [1, 1, 1, 1, 1, 1, 1, 1]
    tuned = [2, 2, 1, 1, 0, 0, 0, 0]
    publish_scores(
        eval_folder, _records("base", "hps", "v2.1", base) + _records("tuned", "hps", "v2.1", tuned)
    )
    publish_scores(eval_folder, _records("base", "pickscore", "PickScore_v1", [20.0] * 8))
    result = _run(capsys, "--images", str(eval_folder), "--a", "base", "--b", "tuned")
    assert set(result["scorers"]) == {"hps@v2.0", "hps@v2.1"}
    assert result["scorers"]["hps@v2.0"]["win_rate"] == 1.0
    v21 = result["scorers"]["hps@v2.1"]
    assert (v21["wins"], v21["ties"], v21["losses"], v21["win_rate"]) == (2, 2, 4, 3 / 8)
    assert result["macro"]["win_rate"] == pytest.approx((1.0 + 3 / 8) / 2)
    assert result["macro"]["win_rate_ties_as_losses"] == pytest.approx((1.0 + 2 / 8) / 2)
    assert "pickscore" in result["skipped"]


@pytest.mark.parametrize(
    ("case", "argv", "message"),
    [
        ("unknown model", ["--a", "base", "--b", "tunned"], "--b tunned: no such model in"),
        ("same model", ["--a", "base", "--b", "base"], "--a and --b are both base"),
        ("no scores", ["--a", "base", "--b", "tuned"], "scores.jsonl: no scores"),
        ("zero pairs", ["--a", "base", "--b", "tuned"], "no (prompt_id, seed) has scores of both"),
    ],
)
def test_cli_mistakes_exit_2_and_write_nothing(
    eval_folder: Path, case: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if case in ("unknown model", "same model", "zero pairs"):
        publish_scores(eval_folder, _records("base", "rule", "1", [1.0] * 8))  # only base is scored
    assert compare.main(["--images", str(eval_folder), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (eval_folder / REPORT_FILE).exists()
    if case == "no scores":
        assert not (eval_folder / SCORES_FILE).exists()
