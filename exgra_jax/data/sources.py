"""Random-access record sources: LLaVA-Med JSON + image folder, and TFDS/ArrayRecord.

Every source yields, per index, the record dict of the data contract:
  {"id": str, "image": path | bytes | uint8 HWC array | None,
   "conversations": [{"from", "value"}...], "conversations_long": [...] | None,
   "answer_type": "OPEN" | "CLOSED" | ""}

Malformed records (no conversation, bad turns) are dropped when a source is opened: a
check of the record alone, so start-up touches no image file. Everything about the image
(a name that leads outside the image folder, a missing or corrupt file) is found when the
record is read (on the host that reads it) and becomes a counted skip in the pipeline,
so start-up makes no file-system call per record. Both stages stop with a `BadDataError`
naming examples when more than `max_bad_fraction` of the data is bad.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from exgra_jax.data.conversation import ConversationError, normalize_turns
from exgra_jax.data.image import ImageDecodeError, resolve_image_path

log = logging.getLogger(__name__)


class BadDataError(RuntimeError):
    """Too many bad records: the data set (or its paths) are probably wrong."""


class RecordError(ValueError):
    """One record that cannot be used (reported with its id and skipped)."""

    def __init__(self, message: str, record_id: str | None = None):
        super().__init__(message)
        self.record_id = record_id


@dataclass
class BadRecordReport:
    """Counts bad records and keeps the first `max_kept` (id, reason) pairs for reporting."""

    max_kept: int = 1000
    num_bad: int = 0
    num_seen: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)

    def add_bad(self, record_id: str, reason: str):
        self.num_bad += 1
        if len(self.examples) < self.max_kept:
            self.examples.append((record_id, reason))

    def summary(self, limit: int = 10) -> str:
        shown = "; ".join(f"{i}: {r}" for i, r in self.examples[:limit])
        more = "" if self.num_bad <= limit else f" (and {self.num_bad - limit} more)"
        return f"{self.num_bad} bad of {self.num_seen} records: {shown}{more}"

    def check(self, max_bad_fraction: float, what: str = "data set"):
        if self.num_seen and self.num_bad > max_bad_fraction * self.num_seen:
            raise BadDataError(
                f"{what}: more than {max_bad_fraction:.1%} of the records are bad "
                f"({self.summary()}); check the paths and the files"
            )


# ------------------------------------------------------------------------------------------
# Record normalization shared by all sources


def _text(value) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return "" if value is None else str(value)


def _turns(value):
    """A turn list from a list or a JSON string ("" / None -> None)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, np.bytes_, np.ndarray)):
        text = _text(value)
        if not text:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"conversation is not valid JSON: {e}") from e
    return value


def normalize_record(raw: dict, index: int) -> dict:
    """Raw JSON/TFDS example -> contract record; raises RecordError when malformed."""
    if not isinstance(raw, dict):
        raise RecordError(f"record is a {type(raw).__name__}, not an object")
    record_id = _text(raw.get("id", "")) or f"#{index}"
    conversations = raw.get("conversations", raw.get("conversatons"))
    conversations = _turns(conversations)
    if conversations is None:
        raise RecordError("record has no 'conversations'")
    image = raw.get("image")
    if isinstance(image, (np.bytes_, np.str_)):
        image = image.item()
    if isinstance(image, np.ndarray) and image.size == 0:
        image = None
    if "has_image" in raw and not int(np.asarray(raw["has_image"])):
        image = None
    if isinstance(image, str) and not image:
        image = None
    if isinstance(image, bytes) and not image:
        image = None
    return {
        "id": record_id,
        "image": image,
        "conversations": conversations,
        "conversations_long": _turns(raw.get("conversations_long")),
        "answer_type": _text(raw.get("answer_type", "")).upper(),
    }


def check_record(record: dict):
    """Checks of the record alone (no file access); raises RecordError naming the problem."""
    try:
        normalize_turns(record["conversations"])
        if record["conversations_long"] is not None:
            normalize_turns(record["conversations_long"])
    except ConversationError as e:
        raise RecordError(str(e)) from e


def subset_indices(num_records: int, fraction: float, seed: int) -> np.ndarray:
    """A deterministic random subset of round(fraction * n) indices (sorted)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(num_records)
    count = max(1, int(round(fraction * num_records)))
    chosen = np.random.default_rng(seed).permutation(num_records)[:count]
    return np.sort(chosen)


# ------------------------------------------------------------------------------------------
# Sources


class JsonSource:
    """LLaVA-Med JSON (pre-training, instruction or VQA files) plus an image folder.

    `paths` may name several JSON files (concatenated in order). Records are normalized
    and checked at construction (no file access); `report` lists the malformed ones.
    Image names are joined with `image_folder` when a record is read, through
    `resolve_image_path`: a name leading outside the folder raises RecordError there
    (unless `allow_outside_image_folder`); whether the file exists is found on decoding.
    """

    def __init__(
        self,
        paths: str | Sequence[str],
        image_folder: str | None = None,
        fraction: float = 1.0,
        seed: int = 0,
        max_bad_fraction: float = 0.05,
        allow_outside_image_folder: bool = False,
    ):
        paths = [paths] if isinstance(paths, str) else list(paths)
        raw = []
        for path in paths:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of records")
            raw.extend(data)
        self.image_folder = image_folder
        self.allow_outside_image_folder = allow_outside_image_folder
        self.report = BadRecordReport()
        self._records = []
        for i in subset_indices(len(raw), fraction, seed):
            record_id = str(raw[i].get("id", f"#{i}")) if isinstance(raw[i], dict) else f"#{i}"
            self.report.num_seen += 1
            try:
                record = normalize_record(raw[i], int(i))
                check_record(record)
            except RecordError as e:
                self.report.add_bad(record_id, str(e))
                continue
            self._records.append(record)
        if self.report.num_bad:
            log.warning("skipping %s", self.report.summary())
        self.report.check(max_bad_fraction, what=", ".join(paths))
        if not self._records:
            raise BadDataError(f"{', '.join(paths)}: no usable records")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        record = self._records[index]
        if not isinstance(record["image"], str):
            return record
        try:
            path = resolve_image_path(
                self.image_folder, record["image"], self.allow_outside_image_folder
            )
        except ImageDecodeError as e:
            raise RecordError(str(e), record["id"]) from e
        return {**record, "image": path}

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self._records]


# The VQA files use the same layout (id, image, answer_type, conversations).
VqaJsonSource = JsonSource


class TfdsSource:
    """A TFDS data set written as ArrayRecord, read through `tfds` data sources.

    `name_or_dir` is either a built dataset directory (the one holding dataset_info.json)
    or a registered dataset name (then `data_dir` says where it was built). Records are
    converted to the contract dict on access; malformed ones raise RecordError there and
    are skipped by the pipeline. `fraction` picks a deterministic subset by seed.
    """

    def __init__(
        self,
        name_or_dir: str,
        split: str,
        data_dir: str | None = None,
        fraction: float = 1.0,
        seed: int = 0,
    ):
        import tensorflow_datasets as tfds

        if os.path.isfile(os.path.join(name_or_dir, "dataset_info.json")):
            builder = tfds.builder_from_directory(name_or_dir)
            self._source = builder.as_data_source(split=split)
        else:
            self._source = tfds.data_source(name_or_dir, split=split, data_dir=data_dir)
        self._indices = subset_indices(len(self._source), fraction, seed)
        self.report = BadRecordReport()

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict:
        raw = self._source[int(self._indices[index])]
        record = normalize_record(dict(raw), int(self._indices[index]))
        check_record(record)
        return record
