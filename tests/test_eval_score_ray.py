"""evaluation.score --ray-address: the scorers run as Ray Data actors on a real cluster, and each image gets the score
the same scorer gives it in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluation import layout, score, scorers


def test_scorer_actors_on_a_cluster_give_the_in_process_scores(
    eval_folder: Path, ray_cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = layout.read_images(eval_folder)
    argv = ["--images", str(eval_folder), "--scorer", "rule", "--batch-size", "3"]
    assert score.main([*argv, "--ray-address", ray_cluster.address, "--num-workers", "2"]) == 0
    on_ray = {r.key[:3]: r.score for r in layout.read_scores(eval_folder)}
    assert len(on_ray) == len(images)
    rule = scorers.load(scorers.resolve("rule"))
    for r in images:
        expected = rule.score([scorers.base.load_rgb(eval_folder / r.path)], [r.prompt])[0]
        assert on_ray[(r.model, r.prompt_id, r.seed)] == pytest.approx(expected, rel=1e-12), r.path
    # a finished run starts no job
    assert score.main([*argv, "--ray-address", ray_cluster.address]) == 0
    assert f"all {len(images)} images already scored" in capsys.readouterr().out
