"""The scorers `--scorer NAME[=ARG]` knows, by name; base.py says what a scorer is."""

from __future__ import annotations

from evaluation.scorers.aesthetic import Aesthetic
from evaluation.scorers.base import Scorer, Source
from evaluation.scorers.clip_h import HPS, ClipH
from evaluation.scorers.pickscore import PickScore
from evaluation.scorers.rule import Rule
from schemas.errors import InputError

SCORERS: dict[str, type[Scorer]] = {s.name: s for s in (PickScore, HPS, ClipH, Aesthetic, Rule)}


def scorer_class(spec: str) -> tuple[type[Scorer], str | None]:
    """`NAME` or `NAME=ARG` → (scorer class, ARG or None)."""
    name, sep, arg = spec.partition("=")
    if name not in SCORERS:
        raise InputError(f"--scorer {spec}: unknown scorer {name!r} (known: {', '.join(SCORERS)})")
    if sep and not arg:
        raise InputError(f"--scorer {spec}: nothing after '='")
    return SCORERS[name], arg or None


def resolve(spec: str) -> Source:
    cls, arg = scorer_class(spec)
    return cls.resolve(arg)


def load(source: Source, device: str | None = None) -> Scorer:
    return SCORERS[source.name](source, device)
