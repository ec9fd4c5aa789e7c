"""The evaluation folder OUT: the one contract between sampling, scoring and comparing.

  OUT/images.jsonl           one record per generated image: model, prompt_id, prompt, seed, path (relative to OUT,
                             a PNG); the sampler writes it, through `publish_images`
  OUT/<model>/settings.json  how that model's images were made (base model, sampler, steps, guidance, ...: free-form)
  OUT/<model>/<prompt_id>_<seed>.png   the images, where `image_path` puts them (any PNG path inside OUT is read)
  OUT/scores.jsonl           one record per image and scorer: model, prompt_id, seed, scorer, version, score, weights
  OUT/report.html            evaluation.compare's page

Two models' images pair up when they share (prompt_id, seed): the sampler draws image j of prompt i from the same noise
for every model. A scorer's `version` tells scores that do not compare apart (HPS v2.0 and v2.1), so the pair key of
a score is (prompt_id, seed) within one (scorer, version). The JSONL files are only ever replaced whole (merged under
a lock, written aside, renamed), so a reader never sees a torn line and two writers never lose each other's records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from schemas.atomic import atomic_write_bytes
from schemas.errors import InputError
from schemas.storage import write_json

IMAGES_FILE = "images.jsonl"
SCORES_FILE = "scores.jsonl"
SETTINGS_FILE = "settings.json"
REPORT_FILE = "report.html"
# A model name is a folder of OUT and a word of the report: no separators, nothing hidden.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")

PromptId = int | str


@dataclass(frozen=True)
class ImageRecord:
    model: str
    prompt_id: PromptId
    prompt: str
    seed: int
    path: str  # relative to OUT

    @property
    def key(self) -> tuple[str, PromptId, int]:
        return (self.model, self.prompt_id, self.seed)


@dataclass(frozen=True)
class ScoreRecord:
    model: str
    prompt_id: PromptId
    seed: int
    scorer: str
    version: str
    score: float
    # where the scorer's weights came from (a local path, or hub id@revision); not part of the key
    weights: str

    @property
    def key(self) -> tuple[str, PromptId, int, str, str]:
        return (self.model, self.prompt_id, self.seed, self.scorer, self.version)


def image_path(model: str, prompt_id: PromptId, seed: int) -> str:
    """Where the sampler puts an image, relative to OUT."""
    return f"{model}/{prompt_id}_{seed}.png"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(where: str, obj: Any, fields: dict[str, Callable[[Any], bool]]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: not a JSON object")
    for name, valid in fields.items():
        if name not in obj:
            raise InputError(f"{where}: no {name!r} field")
        if not valid(obj[name]):
            raise InputError(f"{where}: {name!r} = {obj[name]!r} is not valid")
    return {name: obj[name] for name in fields}


def _valid_prompt_id(value: Any) -> bool:
    return (_is_int(value) and value >= 0) or (isinstance(value, str) and bool(MODEL_NAME.fullmatch(value)))


def _valid_image_path(value: Any) -> bool:
    if not isinstance(value, str) or "\\" in value:
        return False
    path = PurePosixPath(value)
    return not path.is_absolute() and ".." not in path.parts and path.suffix.lower() == ".png"


IMAGE_FIELDS: dict[str, Callable[[Any], bool]] = {
    "model": lambda v: isinstance(v, str) and bool(MODEL_NAME.fullmatch(v)),
    "prompt_id": _valid_prompt_id,
    "prompt": lambda v: isinstance(v, str),
    "seed": _is_int,
    "path": _valid_image_path,
}
SCORE_FIELDS: dict[str, Callable[[Any], bool]] = {
    "model": IMAGE_FIELDS["model"],
    "prompt_id": _valid_prompt_id,
    "seed": _is_int,
    "scorer": lambda v: isinstance(v, str) and bool(v),
    "version": lambda v: isinstance(v, str) and bool(v),
    "score": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    "weights": lambda v: isinstance(v, str),
}


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, object) per non-empty line; `where` is FILE:LINE for error messages."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not JSON ({e})") from e


def read_images(out: str | Path) -> list[ImageRecord]:
    """Every image record of OUT, checked: valid fields, one record per (model, prompt_id, seed)."""
    path = Path(out) / IMAGES_FILE
    if not path.is_file():
        raise InputError(f"{path}: no such file (python -m evaluation.sample writes it)")
    records: dict[tuple, ImageRecord] = {}
    for where, obj in _read_jsonl(path):
        record = ImageRecord(**_check(where, obj, IMAGE_FIELDS))
        if record.key in records:
            raise InputError(f"{where}: a second record for model, prompt_id, seed = {record.key}")
        records[record.key] = record
    return list(records.values())


def read_scores(out: str | Path) -> list[ScoreRecord]:
    """Every score record of OUT (none before the first `evaluation.score`)."""
    path = Path(out) / SCORES_FILE
    if not path.is_file():
        return []
    return [ScoreRecord(**_check(where, obj, SCORE_FIELDS)) for where, obj in _read_jsonl(path)]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """flock on a hidden file beside `path`; the kernel releases it however the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _publish(path: Path, records: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], tuple]) -> int:
    """Merge `records` into the JSONL file at `path`: under its lock, re-read what is there now (another writer may
    have added some), keep the first record of every key, write the whole file aside and rename it into place.
    Returns how many records were new."""
    with _locked(path):
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        seen = {key(json.loads(line)) for line in lines if line.strip()}
        added = 0
        for record in records:
            if key(record) not in seen:
                seen.add(key(record))
                lines.append(json.dumps(record, ensure_ascii=False))
                added += 1
        if added:
            atomic_write_bytes(path, "".join(line + "\n" for line in lines if line.strip()).encode())
        return added


def publish_images(out: str | Path, records: Iterable[ImageRecord]) -> int:
    """Add image records to OUT/images.jsonl (the PNGs must be published first); returns how many were new."""
    return _publish(
        Path(out) / IMAGES_FILE,
        (asdict(r) for r in records),
        lambda r: (r["model"], r["prompt_id"], r["seed"]),
    )


def publish_scores(out: str | Path, records: Iterable[ScoreRecord]) -> int:
    """Add score records to OUT/scores.jsonl; returns how many were new."""
    return _publish(
        Path(out) / SCORES_FILE,
        (asdict(r) for r in records),
        lambda r: (r["model"], r["prompt_id"], r["seed"], r["scorer"], r["version"]),
    )


def write_settings(out: str | Path, model: str, settings: dict[str, Any]) -> None:
    write_json(Path(out) / model / SETTINGS_FILE, settings)


def read_settings(out: str | Path, model: str) -> dict[str, Any] | None:
    path = Path(out) / model / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e})") from e
