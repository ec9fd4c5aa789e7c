"""A config option: a dataclass field that is also a flag, with its help line, its checks and its rule.

The rule is what a changed value means, and `option()` requires it, so no field falls into a default: for
EncodeConfig whether the field changes the output (`Rerun`), for TrainConfig what a resume does with it (`Resume`).
The keys the encode compares on a rerun and the trainer compares on a resume are derived from the rules
(`keys_with`, `rules`), never listed by hand; `check_rules` refuses a config with a field that has none.
"""

from __future__ import annotations

import enum
from dataclasses import field, fields
from typing import Any

from schemas.errors import InputError
from schemas.loss_table import loss_param


class Rerun(enum.Enum):
    """EncodeConfig: what a field is to the output, so what a rerun into the same --out may change."""

    # changes what is written: recorded with the output; a rerun with another value is refused
    OUTPUT = "output"
    # where or how fast the work runs (--out, batch sizes, actors, Ray): not compared, free to change
    RUNTIME = "runtime"


class Resume(enum.Enum):
    """TrainConfig: what `--resume` does when a field differs from the checkpoint's config."""

    # how the run goes on (lr, schedule, logging, evaluation): the new value is applied and the change printed
    APPLIED = "applied"
    # what the run trains (loss, β, seed, LoRA, optimizer): the resume is refused, naming the field
    REFUSED = "refused"
    # the data position depends on it: refused, by checkpoint.check_topology before anything else
    TOPOLOGY = "topology"
    # where the run is, not what it is; --data and --model are compared by content instead (run_dir)
    NOT_COMPARED = "not compared"


FieldRule = Rerun | Resume


def option(
    default: Any,
    help: str,
    *,
    rule: FieldRule,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    required: bool = False,
    loss: str | None = None,
) -> Any:
    """A config field with its flag's help line, its rule (what a changed value means for a rerun or a resume: a
    required choice, so no field falls into a default) and the checks `__post_init__` applies to it. `loss`: the
    field tunes that --loss only, so setting it with another loss is an error rather than silently ignored."""
    meta = {
        "help": help,
        "rule": rule,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "positive": positive,
        "required": required,
        "loss": loss,
    }
    return field(default=default, metadata=meta)


def loss_option(flag: str) -> Any:
    """A loss parameter's field, named `flag` in the loss table: unset means its published default, it is only
    accepted with its loss, and a resume may not change it."""
    loss, param = loss_param(flag)
    return option(None, param.flag_help, rule=Resume.REFUSED, loss=loss)


def rules(cls: type) -> dict[str, FieldRule]:
    """Each field's rule, in field order."""
    return {f.name: f.metadata["rule"] for f in fields(cls)}


def keys_with(cls: type, rule: FieldRule) -> tuple[str, ...]:
    """The fields of `cls` that carry `rule`, in field order."""
    return tuple(name for name, r in rules(cls).items() if r is rule)


def check_rules(cls: type) -> None:
    """Every field of `cls` is an `option(...)` whose rule is of its config's kind (checked at import)."""
    kind = cls.rule_kind
    wrong = [f.name for f in fields(cls) if not isinstance(f.metadata.get("rule"), kind)]
    if wrong:
        raise TypeError(f"{cls.__name__} fields without a {kind.__name__} rule: {wrong}")


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_problems(config: Any, optional: tuple[str, ...] = ()) -> list[str]:
    """Required values present, choices and ranges respected, loss-specific values only with their loss: one
    message per problem, each naming the flag. `optional`: required fields this config can do without."""
    problems = []
    for f in fields(config):
        value, meta, flag = getattr(config, f.name), f.metadata, flag_of(f.name)
        low, high = meta["minimum"], meta["maximum"]
        if meta["required"] and f.name not in optional and not value:
            problems.append(f"{flag} is required")
        elif value is None:
            continue
        elif meta["choices"] and value not in meta["choices"]:
            problems.append(f"{flag} must be one of {meta['choices']}, got {value!r}")
        elif meta["positive"] and value <= 0:
            problems.append(f"{flag} must be > 0, got {value}")
        elif low is not None and high is not None and not low <= value <= high:
            problems.append(f"{flag} must be in [{low}, {high}], got {value}")
        elif low is not None and value < low:
            problems.append(f"{flag} must be >= {low}, got {value}")
        elif meta["loss"] and value != f.default and getattr(config, "loss", None) != meta["loss"]:
            problems.append(f"{flag} applies to --loss {meta['loss']} only, not {config.loss}")
    return problems


def check(config: Any, problems: list[str]) -> None:
    if problems:
        raise InputError("; ".join(problems))
