"""The prompt set of a sampling run, from `--prompts FILE`: a text file (one prompt a line), a JSON list of strings,
or one column of a parquet or CSV file (`FILE.parquet:caption`, so a copy of Pick-a-Pic's `test_unique` works as it
is). A prompt's id is its position in the file (0-based, blank lines of a text file not counted), with or without
`--dedup`, so a deduplicated run and a full one pair up on the prompts they share.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from schemas.errors import InputError

TABLE_SUFFIXES = (".parquet", ".csv")


def split_spec(spec: str) -> tuple[Path, str | None]:
    """`FILE` or `FILE.parquet:COLUMN` / `FILE.csv:COLUMN` → (file, column)."""
    path, sep, column = spec.rpartition(":")
    if sep and Path(path).suffix.lower() in TABLE_SUFFIXES:
        return Path(path), column
    return Path(spec), None


def _column(path: Path, column: str | None) -> list[object]:
    if column is None:
        raise InputError(f"--prompts {path}: name the column of prompts, as --prompts {path}:caption")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        # the names first: Pick-a-Pic's files hold the images too, which are never read
        names = pq.read_schema(path).names
        values = pq.read_table(path, columns=[column]).column(0).to_pylist() if column in names else []
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        names = list(reader.fieldnames or [])
        values = [row[column] for row in rows] if column in names else []
    if column not in names:
        raise InputError(
            f"--prompts {path}:{column}: no column {column!r} (it has {', '.join(names) or 'none'})"
        )
    return values


def _entries(path: Path, column: str | None) -> list[object]:
    if path.suffix.lower() in TABLE_SUFFIXES:
        return _column(path, column)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"--prompts {path}: not JSON ({e})") from e
        if not isinstance(entries, list):
            raise InputError(f"--prompts {path}: expected a JSON list of prompts")
        return entries
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompts(spec: str, dedup: bool = False) -> list[tuple[int, str]]:
    """(prompt_id, prompt) of every prompt of `spec`; with `dedup`, each distinct prompt once (its first id)."""
    path, column = split_spec(spec)
    if not path.is_file():
        raise InputError(f"--prompts {path}: no such file")
    try:
        entries = _entries(path, column)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"--prompts {spec}: cannot be read ({e})") from e
    prompts: list[tuple[int, str]] = []
    seen: set[str] = set()
    for i, prompt in enumerate(entries):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"--prompts {spec}: prompt {i} is {prompt!r}, not a non-empty string")
        if dedup and prompt in seen:
            continue
        seen.add(prompt)
        prompts.append((i, prompt))
    if not prompts:
        raise InputError(f"--prompts {spec}: holds no prompts")
    return prompts
