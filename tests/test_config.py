"""The configs: one validation place (the dataclasses), typed config files, a help line for every flag, the
required flags marked, and the keys earlier versions had."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import pytest

from bench import decode_resize, gpu, losses, robustness, run, s3_stream
from embedded import synthetic, tiny_models
from schemas.config import EncodeConfig, TrainConfig, build_parser, parse_config
from schemas.errors import InputError
from schemas.options import Rerun, Resume, check_rules, keys_with, option
from stages import encode, output_dir
from trainer import checkpoint, demo, evaluate, run_dir, train

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


# The hand-kept lists the field rules replaced, as they stood before (stages/encode.py RUNTIME_KEYS,
# trainer/run_dir.py RESUMABLE and _NOT_COMPARED, trainer/checkpoint.py TOPOLOGY_KEYS): the rules must reproduce
# them exactly, so that deriving them moved no field.
RUNTIME_KEYS_BEFORE = {
    "out",
    "decode_batch_size",
    "encode_batch_size",
    "text_batch_size",
    "num_encoders",
    "ray_address",
    "verbose",
}
RESUMABLE_BEFORE = (
    "learning_rate",
    "scale_lr",
    "lr_scheduler",
    "lr_warmup_steps",
    "max_steps",
    "max_grad_norm",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "mixed_precision",
    "gradient_checkpointing",
    "allow_tf32",
    "checkpoint_every",
    "checkpoints_total_limit",
    "log_every",
    "val_data",
    "eval_every",
    "eval_max_pairs",
    "eval_draws",
    "report_to",
    "max_skipped_fraction",
)
# fields added since, with the rule they state
VAE_SPEED_OPTIONS = {"vae_channels_last", "vae_compile"}
SPEED_OPTIONS = ("compile", "compile_mode", "channels_last", "adamw_impl", "attention_backend")
# added since: images of the policy while it trains (trainer/samples.py), which never touch its draws
SAMPLE_OPTIONS = ("sample_every", "sample_prompts")
NOT_COMPARED_BEFORE = (
    "output_dir",
    "resume",
    "overwrite_output_dir",
    "data",
    "model",
    "fixed_batch",
    "data_only",
)
TOPOLOGY_KEYS_BEFORE = ("world_size", "batch_size", "num_workers")


@pytest.mark.parametrize("cls", [EncodeConfig, TrainConfig])
def test_every_field_states_its_rule(cls: type) -> None:
    """What a changed value means is each field's explicit choice, of its config's kind: none falls into a default."""
    for f in fields(cls):
        assert isinstance(f.metadata.get("rule"), cls.rule_kind), f"{cls.__name__}.{f.name} has no rule"


def test_a_field_without_a_rule_cannot_be_declared() -> None:
    with pytest.raises(TypeError, match="rule"):
        option(0, "a field that does not say what a changed value means")

    @dataclass
    class Config:
        rule_kind: ClassVar[type] = Resume
        stated: int = option(0, "says it", rule=Resume.APPLIED)
        other_kind: int = option(0, "an encode rule on a training config", rule=Rerun.OUTPUT)
        plain: int = 0

    with pytest.raises(TypeError, match=r"Config fields without a Resume rule: \['other_kind', 'plain'\]"):
        check_rules(Config)


def test_the_rules_give_the_lists_they_replaced() -> None:
    assert output_dir.RUNTIME_KEYS == RUNTIME_KEYS_BEFORE | VAE_SPEED_OPTIONS
    assert (
        set(keys_with(EncodeConfig, Rerun.OUTPUT))
        == {f.name for f in fields(EncodeConfig)} - RUNTIME_KEYS_BEFORE - VAE_SPEED_OPTIONS
    )
    assert set(keys_with(TrainConfig, Resume.APPLIED)) == set(
        RESUMABLE_BEFORE + SPEED_OPTIONS + SAMPLE_OPTIONS
    )
    assert set(keys_with(TrainConfig, Resume.NOT_COMPARED)) == set(NOT_COMPARED_BEFORE)
    assert checkpoint.TOPOLOGY_KEYS == TOPOLOGY_KEYS_BEFORE
    # everything else was refused on resume
    rest = {f.name for f in fields(TrainConfig)} - set(
        RESUMABLE_BEFORE + SPEED_OPTIONS + SAMPLE_OPTIONS + NOT_COMPARED_BEFORE + TOPOLOGY_KEYS_BEFORE
    )
    assert set(keys_with(TrainConfig, Resume.REFUSED)) == rest
    cfg = TrainConfig(data="d", model="m", batch_size=3, num_workers=5)
    assert checkpoint.data_topology(cfg, 2) == {"world_size": 2, "batch_size": 3, "num_workers": 5}


def test_resume_compares_each_field_by_its_rule() -> None:
    """Applied: printed; refused (topology included): an error naming each; not compared: ignored; a field the
    checkpoint does not record: compared as None."""
    cfg = TrainConfig(data="d", model="m")
    data = {"fingerprint": "f", "model_family": "sd15"}
    saved = {"config": asdict(cfg), "data": {"fingerprint": "f"}, "model": run_dir.model_id("m")}
    now = replace(cfg, learning_rate=2e-3, output_dir="elsewhere", fixed_batch=True)
    assert run_dir.check_resume_config(Path("ckpt"), saved, now, data) == [
        "resume: learning_rate: checkpoint 1e-08, now 0.002 (applied)"
    ]
    now = replace(cfg, seed=3, batch_size=2, learning_rate=2e-3)
    with pytest.raises(
        InputError, match="seed: checkpoint 0, now 3; batch_size: checkpoint 1, now 2"
    ) as error:
        run_dir.check_resume_config(Path("ckpt"), saved, now, data)
    assert "learning_rate" not in str(error.value)

    def without(key: str) -> dict:
        return {**saved, "config": {k: v for k, v in saved["config"].items() if k != key}}

    assert run_dir.check_resume_config(Path("ckpt"), without("eval_draws"), cfg, data) == [
        "resume: eval_draws: checkpoint None, now 4 (applied)"
    ]
    with pytest.raises(
        InputError, match=r"cannot resume from ckpt: .*sdxl_time_ids: checkpoint None, now 'co"
    ):
        run_dir.check_resume_config(Path("ckpt"), without("sdxl_time_ids"), cfg, data)
