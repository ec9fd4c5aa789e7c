"""What an encode's OUT holds and the rules for writing it: the one module that knows OUT's layout.

Layout of OUT (the trainer trusts only manifest.json, written last; nothing is ever renamed, as S3 has no rename):
  pairs/chunk_K/*.tar + _part.json   one directory per `chunk_files` input files; `_part.json`, written last, lists
                                     the chunk's tars and commits it (a rerun skips committed chunks)
  text/part_K/*.tar + _part.json     caption embeddings, committed the same way; a rerun only encodes new captions
  _checkpoints/chunk_K/              Ray CheckpointConfig of the chunk in flight (row-level resume after kill -9)
  _checkpoints/chunk_K.json          the files of the chunk in flight, so a rerun resumes it with the same files
  _drops/chunk_K/                    per-task records of rows dropped while decoding, merged into `_part.json`
  _encode_config.json                the config of the first run that got to work; a different config is an error
  .encode.lock                       (local OUT) held while an encode runs: a second encode on OUT exits with a message
  _logs/                             (local OUT) the full traceback of a run stopped by an environment failure
  manifest.json, report.json

Ray writes a part's tars straight to their final paths under names unique per run (`shard_name`); each tar is then
read through to its end (a truncated or partial tar fails here, not in the trainer), and `_part.json`, listing
exactly those tars, is written last as the part's single commit point. A directory without `_part.json` is not
published; tars a killed run left beside a `_part.json` are not listed, so nobody reads them.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas import storage
from schemas.config import EncodeConfig, config_to_dict
from schemas.dir_lock import DirLock
from schemas.errors import InputError
from schemas.manifest import MANIFEST_NAME, Manifest, ShardEntry
from schemas.sample import CHECKSUM, PAIR_META_EXT, TENSORS_EXT, read_tar

if TYPE_CHECKING:
    from stages.read_pairs import Prescan

PAIRS, TEXT, CHECKPOINTS, DROPS, LOGS = "pairs", "text", "_checkpoints", "_drops", "_logs"
CHUNK_PREFIX, TEXT_PART_PREFIX = "chunk_", "part_"
CONFIG_MARKER = "_encode_config.json"
LOCK_NAME = ".encode.lock"
# per published directory: its tars with sample counts, plus what the stage recorded
PART_INFO = "_part.json"
PAIR_MEMBERS = (PAIR_META_EXT, TENSORS_EXT)
TEXT_MEMBERS = (TENSORS_EXT,)
RUNTIME_KEYS = EncodeConfig.runtime_keys()


class ConfigMismatch(InputError):
    """OUT holds pairs encoded with another config; the message names the keys that differ."""


def part_name(prefix: str, k: int) -> str:
    """`chunk_00007`, `part_00000`: the directory of part K (and the base name of its checkpoint files)."""
    return f"{prefix}{k:05d}"


def part_index(prefix: str, name: str, suffix: str = "") -> int | None:
    """K of a name `part_name(prefix, K) + suffix`; None for any other name."""
    m = re.fullmatch(rf"{re.escape(prefix)}(\d+){re.escape(suffix)}", name)
    return int(m[1]) if m else None


def shard_name(prefix: str, attempt: int, task: int) -> str:
    """`<prefix>-<attempt>-<task>.tar`: the same input gives the same names on every fresh run, and a resumed run
    writes under the next attempt number (`next_attempt`), so names of two runs never collide."""
    return f"{prefix}-{attempt:03d}-{task:06d}.tar"


def next_attempt(prefix: str, names: list[str]) -> int:
    """One more than the highest attempt that shard_name(prefix, ...) gave any of `names` (tars and checkpoint
    files of earlier runs); 0 when none."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)-\d+\.")
    return max((int(m[1]) for n in names if (m := pattern.match(n))), default=-1) + 1


# ---------------------------------------------------------------------------------------------------------------
# the config OUT is bound to


def output_config(config: EncodeConfig) -> dict[str, Any]:
    """The keys that change what is written; batch sizes, actor counts and the Ray address do not."""
    return {k: v for k, v in config_to_dict(config).items() if k not in RUNTIME_KEYS}


def _normal_src(src: str) -> str:
    """`dir/`, `./dir`, `dir` and `file://dir` name one input: one spelling to compare and record."""
    return ",".join(storage.local_path(p.strip()) for p in src.split(",") if p.strip())


def _normal_model(model: str) -> str:
    """A local folder as an absolute path; a hub id (no such local path) as typed."""
    return storage.local_path(model) if Path(model).expanduser().exists() else model


def normalised(config: EncodeConfig) -> EncodeConfig:
    """Paths as compared with an earlier run and recorded in the manifest."""
    return replace(
        config,
        src=_normal_src(config.src),
        out=storage.local_path(config.out),
        model=_normal_model(config.model),
    )


def recorded_config(recorded: dict[str, Any]) -> dict[str, Any]:
    """A config OUT recorded, as this version compares it: keys this version no longer has are left out (they
    cannot change what it writes; e.g. the never-used `seed` of earlier versions), so older outputs still resume."""
    known = {f.name for f in fields(EncodeConfig)}
    return {k: v for k, v in recorded.items() if k in known}


def compare_configs(previous: dict[str, Any], current: dict[str, Any], out: str) -> None:
    keys = {k: v for k, v in recorded_config(previous).items() if k not in RUNTIME_KEYS}
    keys["src"], keys["model"] = _normal_src(keys.get("src", "")), _normal_model(keys.get("model", ""))
    differing = sorted(k for k in keys.keys() | current.keys() if keys.get(k) != current.get(k))
    if differing:
        detail = ", ".join(f"{k}: {keys.get(k)!r} → {current.get(k)!r}" for k in differing)
        raise ConfigMismatch(f"{out} was encoded with a different config ({detail}); use another --out")


# ---------------------------------------------------------------------------------------------------------------
# committed parts


def verified_keys(url: str, required: tuple[str, ...]) -> list[str]:
    """Read a tar to the end, front to back; returns its keys in order. Raises ValueError naming the tar and key
    when a sample lacks a member or has an unexpected one (only .json/.safetensors are allowed: nothing pickled)."""
    keys = []
    for sample in read_tar(url):
        if set(sample.spans) != set(required):
            raise ValueError(
                f"{url}: sample {sample.key} has members {sorted(sample.spans)}, expected {sorted(required)}"
            )
        keys.append(sample.key)
    return keys


def commit_part(part_dir: str, required: tuple[str, ...], info: dict[str, Any]) -> dict[str, Any]:
    """Check every tar in `part_dir`, drop empty ones, and commit the part by writing its `_part.json` last."""
    shards, keys = [], Counter()
    for name in storage.list_names(part_dir):
        if not name.endswith(".tar"):
            continue
        tar_keys = verified_keys(storage.join(part_dir, name), required)
        if not tar_keys:
            # a write task that got no rows (all checkpointed)
            storage.remove(storage.join(part_dir, name))
            continue
        keys.update(tar_keys)
        shards.append({"path": name, "num_samples": len(tar_keys)})
    duplicates = [k for k, n in keys.items() if n > 1]
    if duplicates:
        raise ValueError(f"{part_dir}: {len(duplicates)} keys written twice, e.g. {duplicates[0]}")
    part = {
        **info,
        # every member went through encode_tensors, which records one
        "checksum": CHECKSUM,
        "shards": shards,
        "num_samples": sum(s["num_samples"] for s in shards),
        "keys": sorted(keys),
    }
    storage.write_json(storage.join(part_dir, PART_INFO), part)
    return part


def source_fingerprints(files: list[str]) -> dict[str, dict[str, Any]]:
    """What a chunk's `_part.json` records of its input files, to tell on a rerun that one changed in place."""
    return {f: storage.fingerprint(f) for f in files}


def refuse_changed_sources(where: str, part: dict[str, Any]) -> None:
    """A committed chunk's input file fixed in place (same name and row count, other content) would otherwise stay
    published as encoded before: refused, naming the file. Chunks of versions that recorded nothing pass."""
    for f, recorded in part.get("sources", {}).items():
        now = storage.fingerprint(f)
        if now != recorded:
            detail = ", ".join(
                f"{k} {recorded.get(k)} → {now.get(k)}" for k in sorted(now) if now[k] != recorded.get(k)
            )
            raise InputError(
                f"{f} changed since {where} was encoded from it ({detail}): its published pairs no longer match "
                "it; restore the file, or encode into another --out"
            )


def load_part(part_dir: str) -> dict[str, Any] | None:
    """A committed part's `_part.json`, or None when the part is not committed."""
    path = storage.join(part_dir, PART_INFO)
    return storage.read_json(path) if storage.exists(path) else None


def published_parts(parent: str, prefix: str) -> list[dict[str, Any]]:
    """`_part.json` of every committed `<prefix>K` directory, in K order, each with its directory name added."""
    parts = []
    for name in storage.list_names(parent):
        part = load_part(storage.join(parent, name)) if part_index(prefix, name) is not None else None
        if part is not None:
            parts.append({**part, "dir": name})
    return parts


def shard_entries(kind: str, parts: list[dict[str, Any]]) -> list[ShardEntry]:
    """The manifest's entries (paths relative to OUT) of the tars `parts` list; `kind` is PAIRS or TEXT."""
    return [
        ShardEntry(f"{kind}/{p['dir']}/{s['path']}", s["num_samples"]) for p in parts for s in p["shards"]
    ]


# ---------------------------------------------------------------------------------------------------------------
# OUT


@dataclass(frozen=True)
class OutputDir:
    """OUT (absolute: Ray workers and the checkpoint store need absolute paths): its paths, lock, config marker,
    chunk plan and the clean-up around a chunk's commit."""

    root: str

    def join(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def manifest(self) -> str:
        return self.join(MANIFEST_NAME)

    @property
    def logs_dir(self) -> str:
        return self.join(LOGS)

    @property
    def marker(self) -> str:
        return self.join(CONFIG_MARKER)

    def chunk_dir(self, k: int) -> str:
        return self.join(PAIRS, part_name(CHUNK_PREFIX, k))

    def checkpoint_dir(self, k: int) -> str:
        return self.join(CHECKPOINTS, part_name(CHUNK_PREFIX, k))

    def in_flight_record(self, k: int) -> str:
        return self.checkpoint_dir(k) + ".json"

    def drops_dir(self, k: int) -> str:
        return self.join(DROPS, part_name(CHUNK_PREFIX, k))

    def text_part_dir(self, k: int) -> str:
        return self.join(TEXT, part_name(TEXT_PART_PREFIX, k))

    def lock(self) -> contextlib.AbstractContextManager[Any]:
        """One encode per local OUT at a time (schemas/dir_lock.py); an OUT the lock created and that stayed empty
        is removed again. Object storage has no locks: there the commit files keep concurrent runs correct, not
        exclusive."""
        if storage.is_remote(self.root):
            return contextlib.nullcontext()

        def refusal(holder: str) -> str:
            return (
                f"{self.root}: another encode is writing there ({holder}); wait for it to finish or use another "
                "--out"
            )

        return DirLock(self.root, LOCK_NAME, refusal)

    def committed_chunks(self) -> list[dict[str, Any]]:
        return published_parts(self.join(PAIRS), CHUNK_PREFIX)

    def committed_text_parts(self) -> list[dict[str, Any]]:
        return published_parts(self.join(TEXT), TEXT_PART_PREFIX)

    def chunk_part(self, k: int) -> dict[str, Any] | None:
        return load_part(self.chunk_dir(k))

    def _in_flight(self) -> Iterator[int]:
        """K of every chunk with a `_checkpoints/chunk_K.json` record."""
        for name in storage.list_names(self.join(CHECKPOINTS)):
            k = part_index(CHUNK_PREFIX, name, ".json")
            if k is not None:
                yield k

    def previous_config(self) -> dict[str, Any] | None:
        """The config OUT holds pairs of: the manifest's, else the marker's once a chunk is committed or has rows
        checkpointed. Caption embeddings alone do not bind OUT: a run that failed after them (e.g. on a broken VAE)
        must not block the corrected rerun, which re-encodes them (they are few and cheap)."""
        if storage.exists(self.manifest):
            return Manifest.load(self.root).encode_config
        checkpoints = self.join(CHECKPOINTS)
        # Ray creates the folder before its first commit: only one with files holds rows
        checkpointed = [
            n
            for n in storage.list_names(checkpoints)
            if not n.endswith(".json") and storage.list_names(storage.join(checkpoints, n))
        ]
        pairs = self.committed_chunks() or checkpointed
        return storage.read_json(self.marker) if pairs and storage.exists(self.marker) else None

    def check_config(self, current: dict[str, Any]) -> None:
        """Refuse `current` (an `output_config`) when OUT holds pairs of another config; what a failed attempt with
        another config left (no pairs yet) is removed."""
        previous = self.previous_config()
        if previous is not None:
            compare_configs(previous, current, self.root)
        elif storage.exists(self.marker) and recorded_config(storage.read_json(self.marker)) != current:
            for stale in (TEXT, PAIRS, CHECKPOINTS, DROPS):
                storage.remove(self.join(stale))

    def write_marker(self, current: dict[str, Any]) -> None:
        storage.write_json(self.marker, current)

    def plan_chunks(self, files: list[str], scan: Prescan, chunk_files: int) -> list[tuple[int, list[str]]]:
        """(K, files) of every chunk of this OUT: committed chunks and the one a killed run left in flight keep
        their files; files that are in none of them (all of them on a first run, new ones later) form new chunks
        after them. A committed chunk whose files are gone from SRC or changed is an error: the manifest would not
        match SRC."""
        plan: dict[int, list[str]] = {}
        listed = set(files)
        for part in self.committed_chunks():
            k, where = part_index(CHUNK_PREFIX, part["dir"]), self.join(PAIRS, part["dir"])
            gone = [f for f in part["files"] if f not in listed]
            if gone:
                raise InputError(
                    f"{where} holds rows of {gone[0]}, which --src no longer lists; use another --out"
                )
            rows = sum(scan.per_file[f].rows for f in part["files"])
            if rows != part["rows_read"]:
                raise InputError(
                    f"{where}: its files now hold {rows} rows, {part['rows_read']} when encoded; use another --out"
                )
            refuse_changed_sources(where, part)
            plan[k] = part["files"]
        for k in self._in_flight():
            record = storage.read_json(self.in_flight_record(k))
            in_flight = record["files"]
            assigned = {f for fs in plan.values() for f in fs}
            if (
                k not in plan
                and listed.issuperset(in_flight)
                and not assigned.intersection(in_flight)
                and record.get("sources", {}) in ({}, source_fingerprints(in_flight))
            ):
                plan[k] = in_flight
            else:
                # its files changed (or were fixed in place) since it was killed: that chunk starts again
                storage.remove(self.checkpoint_dir(k))
                storage.remove(self.in_flight_record(k))
        assigned = {f for fs in plan.values() for f in fs}
        new = [f for f in files if f not in assigned]
        first = max(plan, default=-1) + 1
        for i in range(0, len(new), chunk_files):
            plan[first + i // chunk_files] = new[i : i + chunk_files]
        return sorted(plan.items())

    def uncommitted(self, plan: list[tuple[int, list[str]]]) -> list[int]:
        """K of every chunk of `plan` that is not committed yet."""
        return [k for k, _ in plan if self.chunk_part(k) is None]

    def start_chunk(self, k: int, files: list[str], sources: dict[str, dict[str, Any]]) -> None:
        """Before chunk K's job: without committed rows, whatever a killed run left in its directories is
        unaccounted for and goes; its files and their fingerprints are recorded, so a rerun after a kill resumes it
        with the same files, unless one of them changed meanwhile."""
        if not storage.exists(self.checkpoint_dir(k)):
            storage.remove(self.chunk_dir(k))
            storage.remove(self.drops_dir(k))
        storage.write_json(self.in_flight_record(k), {"files": files, "sources": sources})

    def finish_chunk(self, k: int) -> None:
        """After chunk K is committed (or found committed): its checkpoint, record and drop files go; a kill between
        commit and clean-up leaves them."""
        for leftover in (self.checkpoint_dir(k), self.in_flight_record(k), self.drops_dir(k)):
            storage.remove(leftover)
