"""Random-access record sources: LLaVA-Med JSON + image folder, and TFDS/ArrayRecord.

Every source yields, per index, the record dict of the data contract:
  {"id": str, "image": path | bytes | uint8 HWC array | None,
   "conversations": [{"from", "value"}...], "conversations_long": [...] | None,
   "answer_type": "OPEN" | "CLOSED" | ""}

Nothing is checked per record when a source is opened, so start-up does not grow with
the data set: a malformed record (no conversation, bad turns) and everything about the
image (a name that leads outside the image folder, a missing or corrupt file) are found
when the record is read (on the host that reads it) and become counted skips in the
pipeline, which stops with a `BadDataError` naming examples when more than
`max_bad_fraction` of the records read are bad.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from etils import epath

from exgra_jax.data.conversation import ConversationError, normalize_turns
from exgra_jax.data.image import ImageDecodeError, resolve_image_path
from exgra_jax.paths import basename, is_url

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


def index_cache_dir() -> str:
    """Where JSON record indexes (and local copies of remote JSON files) are kept:
    $EXGRA_DATA_CACHE, else $XDG_CACHE_HOME/exgra_jax/json_index (~/.cache by default)."""
    if os.environ.get("EXGRA_DATA_CACHE"):
        return os.environ["EXGRA_DATA_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "exgra_jax", "json_index")


def scan_json_list(data: bytes, where: str) -> np.ndarray:
    """Byte spans ``[n, 2]`` (start, end) of the elements of a top-level JSON list.

    Decoded as latin-1, one character per byte, so the decoder's character positions are
    byte positions; UTF-8's multi-byte sequences contain no byte JSON gives a meaning to."""
    text = data.decode("latin-1")
    decoder, space = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    pos = space.match(text).end()
    if text[pos:pos + 1] != "[":
        raise ValueError(f"{where}: expected a JSON list of records")
    pos = space.match(text, pos + 1).end()
    spans = []
    while text[pos:pos + 1] != "]":
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON: {e}") from e
        spans.append((pos, end))
        pos = space.match(text, end).end()
        if text[pos:pos + 1] == ",":
            pos = space.match(text, pos + 1).end()
        elif text[pos:pos + 1] != "]":
            raise ValueError(f"{where}: expected ',' or ']' at byte {pos}")
    if space.match(text, pos + 1).end() != len(text):
        raise ValueError(f"{where}: unexpected data after the JSON list (byte {pos + 1})")
    return np.asarray(spans, np.int64).reshape(-1, 2)


def indexed_json(path: str, cache_dir: str | None = None) -> tuple[str, np.ndarray]:
    """(a local file holding ``path``'s bytes, the byte spans of its records).

    The spans are computed once per file version (path, size, modification time) and kept
    in ``cache_dir``, so opening a data set again reads 16 bytes per record, not the JSON.
    A remote file (gs://...) is copied into the cache once, and records are read there."""
    cache_dir = cache_dir or index_cache_dir()
    if is_url(path):
        stat = epath.Path(path).stat()
        version = (path, stat.length, stat.mtime)
    else:
        path = os.path.abspath(path)
        stat = os.stat(path)
        version = (path, stat.st_size, stat.st_mtime_ns)
    key = hashlib.sha256(json.dumps(version).encode()).hexdigest()[:32]
    base = os.path.join(cache_dir, f"{basename(path)}.{key}")
    local = path if not is_url(path) else base + ".json"
    index = base + ".spans.npy"
    if os.path.exists(index) and os.path.exists(local):
        return local, np.load(index, mmap_mode="r")
    os.makedirs(cache_dir, exist_ok=True)
    data = epath.Path(path).read_bytes()
    spans = scan_json_list(data, path)
    if local != path:
        _write_atomically(local, lambda f: f.write(data))
    _write_atomically(index, lambda f: np.save(f, spans))
    log.info("indexed %d records of %s in %s", len(spans), path, index)
    return local, spans


def _write_atomically(path: str, write) -> None:
    """Through a temporary sibling, so that processes building the same index at once never
    read half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


class JsonSource:
    """LLaVA-Med JSON (pre-training, instruction or VQA files) plus an image folder.

    `paths` may name several JSON files (concatenated in order), local or gs://. Opening
    reads only a byte-span index per file (`indexed_json`, built on first use), so
    start-up does not grow with the data set. Each record is parsed, normalized and checked
    when it is read: a malformed record raises RecordError there (with its id), which the
    pipeline counts as a skip and holds against its `max_bad_fraction` (so this source's
    own `report` stays empty). Image names are joined
    with `image_folder` then, through `resolve_image_path`: a name leading outside the
    folder raises RecordError (unless `allow_outside_image_folder`); whether the file exists
    is found on decoding.
    """

    def __init__(
        self,
        paths: str | Sequence[str],
        image_folder: str | None = None,
        fraction: float = 1.0,
        seed: int = 0,
        allow_outside_image_folder: bool = False,
        cache_dir: str | None = None,
    ):
        paths = [paths] if isinstance(paths, str) else list(paths)
        indexed = [indexed_json(path, cache_dir) for path in paths]
        self._files = [local for local, _ in indexed]
        self._spans = [spans for _, spans in indexed]
        self._first = np.cumsum([0] + [len(spans) for spans in self._spans])
        self.image_folder = image_folder
        self.allow_outside_image_folder = allow_outside_image_folder
        self.report = BadRecordReport()
        self._indices = subset_indices(int(self._first[-1]), fraction, seed)
        if not len(self._indices):
            raise BadDataError(f"{', '.join(paths)}: no records")

    def __len__(self) -> int:
        return len(self._indices)

    def _raw(self, i: int):
        """Record ``i`` of the concatenated files, parsed."""
        f = int(np.searchsorted(self._first, i, side="right")) - 1
        start, end = (int(x) for x in self._spans[f][i - self._first[f]])
        with open(self._files[f], "rb") as fh:
            fh.seek(start)
            return json.loads(fh.read(end - start))

    def __getitem__(self, index: int) -> dict:
        i = int(self._indices[index])
        raw = self._raw(i)
        record_id = str(raw.get("id", f"#{i}")) if isinstance(raw, dict) else f"#{i}"
        try:
            record = normalize_record(raw, i)
            check_record(record)
        except RecordError as e:
            raise RecordError(str(e), record_id) from e
        if not isinstance(record["image"], str):
            return record
        try:
            path = resolve_image_path(
                self.image_folder, record["image"], self.allow_outside_image_folder
            )
        except ImageDecodeError as e:
            raise RecordError(str(e), record["id"]) from e
        return {**record, "image": path}


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
