"""`--format webdataset`: tar shards (local, glob, brace pattern or URL) as a Pick-a-Pic mirror stores them.

A sample is `<key>.jpg_0`, `<key>.jpg_1` and `<key>.json` with the caption, the label and optionally the id. With
`--columns`, image roles name member extensions and caption/label_0/id name JSON keys (defaults: jpg_0, jpg_1,
caption, label_0, ranking_id; `chosen=…,rejected=…` for pairs whose first image is preferred). A sample without
an id gets `stable_id(shard relative to --src, key)`. Shards are streamed front to back: sequential reads only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, ClassVar

import pyarrow as pa

from schemas.errors import InputError
from schemas.sample import read_tar
from stages.formats import ID_LABEL_CAPTION, ROWS_PER_BLOCK, PairFormat, canonical_table

META_EXT = "json"


class WebDatasetFormat(PairFormat):
    name = "webdataset"
    suffix = ".tar"
    default_columns: ClassVar[dict[str, str]] = {
        "caption": "caption",
        "image_0": "jpg_0",
        "image_1": "jpg_1",
        "label_0": "label_0",
        "id": "ranking_id",
    }

    @property
    def image_exts(self) -> tuple[str, str]:
        roles = ("image_0", "image_1") if self.labelled else ("chosen", "rejected")
        return self.columns[roles[0]], self.columns[roles[1]]

    def _samples(
        self, path: str, read_images: bool
    ) -> Iterator[tuple[str, dict[str, Any], list[bytes | None]]]:
        """(key, parsed json, [image_0, image_1] or [None, None]) per sample, in file order, through schemas'
        tar reader (WebDataset's key rule; an unreadable tar or a member twice is a CorruptSampleError), checking
        each sample holds every member; errors name the shard, the key and the member or JSON key. Samples with
        none of the members are skipped."""
        wanted = {META_EXT, *self.image_exts}
        for sample in read_tar(path, read=wanted if read_images else (META_EXT,)):
            if not wanted & sample.spans.keys():
                continue
            missing = sorted(wanted - sample.spans.keys())
            if missing:
                raise InputError(
                    f"{path}: sample {sample.key!r} lacks member(s) {['.' + m for m in missing]}"
                )
            try:
                meta = json.loads(sample.data[META_EXT])
            except ValueError as e:
                raise InputError(f"{path}: sample {sample.key!r}: {META_EXT} member is not JSON ({e})") from e
            if not isinstance(meta, dict):
                raise InputError(f"{path}: sample {sample.key!r}: {META_EXT} member is not a JSON object")
            yield sample.key, meta, [sample.data.get(e) for e in self.image_exts]

    def _fields(self, path: str, key: str, meta: dict[str, Any]) -> tuple[int, str | None, float | None]:
        """(ranking_id, caption, label_0) of one sample; a missing JSON key is an error naming it."""
        for role in ("caption", "label_0"):
            if role in self.columns and self.columns[role] not in meta:
                raise InputError(f"{path}: sample {key!r}: JSON has no key {self.columns[role]!r} ({role})")
        caption = meta[self.columns["caption"]]
        if caption is not None and not isinstance(caption, str):
            raise InputError(f"{path}: sample {key!r}: {self.columns['caption']!r} is not a string")
        label: Any = meta[self.columns["label_0"]] if self.labelled else 1.0
        if label is not None and (isinstance(label, bool) or not isinstance(label, int | float)):
            raise InputError(
                f"{path}: sample {key!r}: {self.columns['label_0']!r} is not a number ({label!r})"
            )
        rid = meta.get(self.columns.get("id", ""))
        if rid is None:
            rid = self.stable_row_id(path, key)
        elif isinstance(rid, bool) or not isinstance(rid, int):
            raise InputError(f"{path}: sample {key!r}: {self.columns['id']!r} is not an integer ({rid!r})")
        return rid, caption, None if label is None else float(label)

    def read_ids_labels_captions(self, path: str) -> pa.Table:
        rows: dict[str, list] = {"ranking_id": [], "label_0": [], "caption": []}
        for key, meta, _ in self._samples(path, read_images=False):
            rid, caption, label = self._fields(path, key, meta)
            rows["ranking_id"].append(rid)
            rows["label_0"].append(label)
            rows["caption"].append(caption)
        return pa.table(rows, schema=ID_LABEL_CAPTION)

    def read(self, path: str) -> Iterator[pa.Table]:
        rows: dict[str, list] = {c: [] for c in ("ranking_id", "caption", "label_0", "jpg_0", "jpg_1")}
        rows |= {"image_0_uid": [], "image_1_uid": []}
        for key, meta, images in self._samples(path, read_images=True):
            rid, caption, label = self._fields(path, key, meta)
            for name, value in zip(rows, (rid, caption, label, *images), strict=False):
                rows[name].append(value)
            for j, ext in enumerate(self.image_exts):
                # a Pick-a-Pic mirror keeps the image uids in the JSON
                rows[f"image_{j}_uid"].append(str(meta.get(f"image_{j}_uid") or f"{key}.{ext}"))
            if len(rows["ranking_id"]) == ROWS_PER_BLOCK:
                yield canonical_table(rows)
                rows = {k: [] for k in rows}
        if rows["ranking_id"]:
            yield canonical_table(rows)
