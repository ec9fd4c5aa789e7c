"""The configs: one validation place (the dataclasses), typed config files, a help line for every flag, the
required flags marked, and the keys earlier versions had."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from bench import decode_resize, gpu, losses, robustness, run, s3_stream
from embedded import synthetic, tiny_models
from schemas.config import EncodeConfig, TrainConfig, build_parser, parse_config
from schemas.errors import InputError
from stages import encode, output_dir
from trainer import demo, evaluate, train

PARSERS = {
    "stages.encode": lambda: build_parser(EncodeConfig, ""),
    "trainer.train": lambda: build_parser(TrainConfig, ""),
    "trainer.demo": lambda: build_parser(TrainConfig, "", parents=[demo.demo_arguments()]),
    "trainer.evaluate": evaluate.arguments,
    "embedded.synthetic": synthetic.arguments,
    "embedded.tiny_models": tiny_models.arguments,
    "bench.run": run.arguments,
    "bench.gpu": gpu.arguments,
    "bench.s3_stream": s3_stream.arguments,
    "bench.decode_resize": decode_resize.arguments,
    "bench.losses": losses.arguments,
    "bench.robustness": robustness.arguments,
}
REQUIRED = {
    "stages.encode": {"--src", "--out", "--model"},
    "trainer.train": {"--data", "--model"},
    "trainer.evaluate": {"--data", "--model"},
}


@pytest.mark.parametrize("cli", sorted(PARSERS))
def test_every_flag_has_a_help_line(cli: str) -> None:
    actions = [a for a in PARSERS[cli]()._actions if not isinstance(a, argparse._HelpAction)]
    assert actions
    undocumented = [a.option_strings[0] for a in actions if not (a.help or "").strip()]
    assert undocumented == [], f"{cli}: flags without a help line: {undocumented}"


@pytest.mark.parametrize(("cli", "main"), [("stages.encode", encode.main), ("trainer.train", train.main)])
def test_help_shows_each_field_and_the_required_group(
    cli: str, main, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    cls = EncodeConfig if cli == "stages.encode" else TrainConfig
    for f in fields(cls):
        assert "".join(f.metadata["help"].split()) in text, f.name
    required_section = text.split("required(onthecommandlineorin--config):")[1].split("options:")[0]
    for flag in REQUIRED[cli]:
        assert flag in required_section


@pytest.mark.parametrize("cli", sorted(REQUIRED))
def test_required_flags_are_marked(cli: str) -> None:
    parser = PARSERS[cli]()
    marked = {
        a.option_strings[0]
        for a in parser._actions
        if a.required
        or any(a in g._group_actions for g in parser._action_groups if g.title.startswith("required"))
    }
    assert marked == REQUIRED[cli]


def test_a_missing_required_flag_is_exit_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert encode.main(["--out", str(tmp_path / "out"), "--model", "m"]) == 2
    assert "--src is required" in capsys.readouterr().err
    assert train.main(["--data", str(tmp_path)]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("main", "text", "message"),
    [
        (encode.main, 'shard_size = "100"\n', "shard_size = '100' is a str, expected int"),
        (encode.main, "flip = 1\n", "flip = 1 is a int, expected bool"),
        (train.main, "max_steps = 2.5\n", "max_steps = 2.5 is a float, expected int"),
        (train.main, 'scale_lr = "no"\n', "scale_lr = 'no' is a str, expected bool"),
    ],
)
def test_a_mistyped_config_file_value_is_exit_2_naming_the_key(
    main, text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_config_file_values_become_the_flag_types(tmp_path: Path) -> None:
    """An int where a float is due is converted as `--learning-rate 1` would be; the command line wins."""
    config = tmp_path / "c.toml"
    config.write_text('learning_rate = 1\nbeta = 2500\ndata = "from-file"\nmodel = "m"\nmax_steps = 7\n')
    cfg = parse_config(TrainConfig, ["--config", str(config), "--max-steps", "9"], "")
    assert type(cfg.learning_rate) is float and cfg.learning_rate == 1.0
    assert type(cfg.beta) is float and cfg.beta == 2500.0
    assert (cfg.data, cfg.max_steps) == ("from-file", 9)


def test_a_config_built_in_code_is_checked_like_the_cli() -> None:
    with pytest.raises(InputError, match="--batch-size must be >= 1, got 0"):
        TrainConfig(data="d", model="m", batch_size=0)
    with pytest.raises(InputError, match=r"--caption-dropout must be in \[0.0, 1.0\], got 1.5"):
        TrainConfig(data="d", model="m", caption_dropout=1.5)
    with pytest.raises(InputError, match="--resolution must be a multiple of 8"):
        EncodeConfig(src="s", out="o", model="m", resolution=500)
    with pytest.raises(InputError, match="--latent-mode must be one of"):
        EncodeConfig(src="s", out="o", model="m", latent_mode="median")
    assert TrainConfig(data="d", data_only=True).model == ""  # the stream benchmark needs no model


@pytest.mark.parametrize(("main", "key"), [(encode.main, "seed"), (train.main, "extra")])
def test_removed_keys_are_unknown(main, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """EncodeConfig.seed was never read and TrainConfig.extra never used: a file that sets them is told so."""
    config = tmp_path / "c.json"
    config.write_text(f'{{"{key}": 0}}')
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config)])
    assert exit_info.value.code == 2
    assert f"unknown keys ['{key}']" in capsys.readouterr().err


def test_an_output_recorded_with_the_old_seed_key_still_resumes() -> None:
    """Outputs written before `seed` was removed record it in _encode_config.json and the manifest; a rerun must
    not call that a different config (it never changed what was written). A real difference still is one."""
    current = output_dir.output_config(EncodeConfig(src="/data/in", out="/data/out", model="org/model"))
    for seed in (0, 7):
        output_dir.compare_configs({**current, "seed": seed}, current, "/data/out")
    with pytest.raises(output_dir.ConfigMismatch, match="resolution: 256 → 512"):
        output_dir.compare_configs({**current, "seed": 0, "resolution": 256}, current, "/data/out")
