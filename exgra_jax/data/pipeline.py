"""Grain input pipeline: per-process shard, seeded shuffle, worker preprocessing, batching.

Training:  source -> shuffle(seed, reshuffled every epoch) -> repeat(num_epochs)
           -> this process's strided shard -> preprocess (in workers) -> drop bad records
           and batch (in workers) -> host batch of numpy arrays. With `packing`, the batch
           step packs several examples per row instead (packing.py, PACKED_BATCH_KEYS).
Evaluation: source in order -> this process's strided shard, padded so every process has
           the same number of batches -> preprocess -> batch; padding rows and records
           that fail to decode have example_mask 0.

The iterator state (`get_state` / `set_state`) is Grain's, so a restored iterator yields
exactly the batches an uninterrupted one would (for the same worker_count).
`make_global_batch` turns a host batch into global jax.Arrays sharded on the batch axes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grain
import numpy as np

from exgra_jax.data.conversation import ConversationError, ConversationTokenizer
from exgra_jax.data.image import (
    ImageConfig,
    ImageDecodeError,
    ImagePreprocessor,
    normalization,
)
from exgra_jax.data.medical_image import MedicalImageOptions
from exgra_jax.data.packing import PACKED_BATCH_KEYS, BatchPacker
from exgra_jax.data.sources import BadDataError, BadRecordReport, JsonSource, RecordError
from exgra_jax.parallel import make_global_batch  # noqa: F401  (re-exported for callers)

log = logging.getLogger(__name__)

# Keys of an unpacked host batch (the data contract); private bookkeeping keys start with
# "_". Packed training batches have PACKED_BATCH_KEYS instead.
BATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "labels",
    "pixel_values",
    "has_image",
    "response_ids",
    "response_mask",
    "caption_ids",
    "caption_mask",
    "example_mask",
)


@dataclass(frozen=True)
class DataConfig:
    """Everything the pipeline needs; defaults follow ExGra-Med at 7B."""

    json_paths: tuple[str, ...] = ()  # LLaVA-Med JSON files (or use tfds_name)
    image_folder: str | None = None
    allow_outside_image_folder: bool = False  # else absolute / '..' image names are skipped
    medical: MedicalImageOptions = MedicalImageOptions()  # DICOM / NIfTI windowing
    tfds_name: str | None = None  # a built TFDS directory or a registered name
    tfds_split: str = "train"
    tfds_data_dir: str | None = None
    template: str = "llava_v0"
    max_len: int = 2048  # T
    response_len: int = 128  # Tr
    caption_len: int = 256  # Tc
    image_size: int = 224
    image_aspect: str = "pad"  # "pad" | "crop"
    vision_type: str = "clip"  # the tower's pixel normalization (image.normalization)
    num_image_tokens: int = 256
    mm_use_im_start_end: bool = True
    batch_size: int = 8  # per host (rows, when packing)
    # Training only: several examples per row of max_len tokens (first fit in arrival order),
    # at most images_per_row images and examples_per_row examples per row.
    packing: bool = False
    images_per_row: int = 6  # tools/benchmarks/packing.py recommends both per data mix
    examples_per_row: int = 8
    seed: int = 0
    fraction: float = 1.0
    max_bad_fraction: float = 0.05
    min_seen_before_check: int = 64  # decode failures are judged after this many records
    worker_count: int = 0  # 0: preprocess in this process
    worker_buffer_size: int = 2  # batches each worker prepares ahead
    read_threads: int = 1  # threads reading + preprocessing inside each worker
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever

    def __post_init__(self):
        if isinstance(self.json_paths, str):
            object.__setattr__(self, "json_paths", (self.json_paths,))
        if isinstance(self.medical, dict):
            object.__setattr__(self, "medical", MedicalImageOptions(**self.medical))
        if not self.json_paths and not self.tfds_name:
            raise ValueError("DataConfig needs json_paths or tfds_name")
        for name in ("max_len", "response_len", "caption_len", "batch_size", "image_size",
                     "images_per_row", "examples_per_row"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DataConfig.{name} must be positive")
        if not 0.0 <= self.max_bad_fraction < 1.0:
            raise ValueError("max_bad_fraction must be in [0, 1)")
        if self.worker_count < 0 or self.read_threads < 1:
            raise ValueError("worker_count must be >= 0 and read_threads >= 1")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError("num_epochs must be positive or None")
        image_block = self.num_image_tokens + (2 if self.mm_use_im_start_end else 0)
        if image_block >= self.max_len:
            raise ValueError(f"max_len={self.max_len} cannot hold {image_block} image tokens")
        if self.packing:
            self._check_packing(image_block)

    def _check_packing(self, image_block: int):
        if self.examples_per_row < self.images_per_row:
            raise ValueError(
                f"examples_per_row={self.examples_per_row} < images_per_row="
                f"{self.images_per_row}: each image belongs to one example; raise "
                f"examples_per_row or lower images_per_row")
        if self.images_per_row * image_block > self.max_len:
            raise ValueError(
                f"images_per_row={self.images_per_row} blocks of {image_block} image tokens "
                f"exceed max_len={self.max_len}; set images_per_row <= "
                f"{self.max_len // image_block} or raise max_len")

    def replace(self, **changes) -> DataConfig:
        return dataclasses.replace(self, **changes)


def batch_keys(cfg: DataConfig) -> tuple[str, ...]:
    """The keys of the training host batches `cfg` makes."""
    return PACKED_BATCH_KEYS if cfg.packing else BATCH_KEYS


def make_source(cfg: DataConfig):
    """The record source a config names (JSON files or a TFDS data set)."""
    if cfg.tfds_name:
        from exgra_jax.data.sources import TfdsSource

        return TfdsSource(
            cfg.tfds_name, cfg.tfds_split, cfg.tfds_data_dir, fraction=cfg.fraction, seed=cfg.seed
        )
    return JsonSource(
        cfg.json_paths,
        cfg.image_folder,
        fraction=cfg.fraction,
        seed=cfg.seed,
        allow_outside_image_folder=cfg.allow_outside_image_folder,
    )


# ------------------------------------------------------------------------------------------
# Per-example preprocessing (runs in worker processes)


class ExampleProcessor:
    """record -> dict of fixed-shape numpy arrays, or a `_bad` marker naming the problem."""

    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg = cfg
        self.text = ConversationTokenizer(
            tokenizer, cfg.template, cfg.num_image_tokens, cfg.mm_use_im_start_end
        )
        self.image = ImagePreprocessor(
            ImageConfig(cfg.image_size, cfg.image_aspect, *normalization(cfg.vision_type),
                        medical=cfg.medical)
        )
        needed = self.text.min_length_with_image
        if cfg.max_len < needed:
            raise ValueError(
                f"max_len={cfg.max_len} cannot hold the {cfg.template} prompt and the image "
                f"tokens ({needed} tokens before any text)"
            )

    def process(self, record: dict) -> dict:
        has_image = record["image"] is not None
        pixels = self.image(record["image"]) if has_image else self.image.blank()
        seq = self.text.tokenize_conversation(
            record["conversations"], has_image, self.cfg.max_len
        )
        response_ids, response_mask = self.text.answers(
            record["conversations"], self.cfg.response_len
        )
        long_turns = record.get("conversations_long")
        fallback = not long_turns
        caption_ids, caption_mask = self.text.answers(
            record["conversations"] if fallback else long_turns, self.cfg.caption_len
        )
        return {
            "input_ids": seq.input_ids,
            "attention_mask": seq.attention_mask,
            "labels": seq.labels,
            "pixel_values": pixels,
            "has_image": np.int32(has_image),
            "response_ids": response_ids,
            "response_mask": response_mask,
            "caption_ids": caption_ids,
            "caption_mask": caption_mask,
            "example_mask": np.int32(1),
            "_caption_fallback": np.int32(fallback),
            "_truncated": np.int32(seq.truncated),
        }

    def __call__(self, item) -> dict:
        """`item` is (index, record-or-exception) as produced by `_read`."""
        index, record = item
        if isinstance(record, Exception):
            return {"_bad": getattr(record, "record_id", None) or f"#{index}",
                    "_reason": str(record)}
        try:
            example = self.process(record)
        except (ImageDecodeError, ConversationError, RecordError) as e:
            return {"_bad": record["id"], "_reason": str(e)}
        example["_index"] = np.int32(index)
        return example

    def padding_example(self) -> dict:
        cfg = self.cfg
        pad = self.text.ids["pad"]

        def ids(n):
            return np.full(n, pad, np.int32)

        return {
            "input_ids": ids(cfg.max_len),
            "attention_mask": np.zeros(cfg.max_len, np.int32),
            "labels": np.full(cfg.max_len, -100, np.int32),
            "pixel_values": self.image.blank(),
            "has_image": np.int32(0),
            "response_ids": ids(cfg.response_len),
            "response_mask": np.zeros(cfg.response_len, np.int32),
            "caption_ids": ids(cfg.caption_len),
            "caption_mask": np.zeros(cfg.caption_len, np.int32),
            "example_mask": np.int32(0),
            "_caption_fallback": np.int32(0),
            "_truncated": np.int32(0),
            "_index": np.int32(-1),
        }


class _SafeRead:
    """Random access that turns a failing record read into a value the processor reports."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        try:
            return (index, self.source[index])
        except (RecordError, ImageDecodeError, OSError, ValueError, KeyError) as e:
            return (index, e)


# ------------------------------------------------------------------------------------------
# Skip bad records and batch, inside the workers, keeping Grain's exact iterator state


def _stack(examples: Sequence[dict]) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class _SkipBadIterator(grain.DatasetIterator):
    """Reads good examples from the parent; bad ones are counted, checked against
    max_bad_fraction and reported in the next batch's `_skipped_*` fields."""

    def __init__(self, parent, max_bad_fraction, min_seen):
        super().__init__(parent)
        self._max_bad_fraction = max_bad_fraction
        self._min_seen = min_seen
        self._report = BadRecordReport(max_kept=20)
        self._bad_ids, self._bad_reasons = [], []

    def _read(self) -> dict:
        return next(self._parent)

    def _next_good(self) -> dict:
        """The next good example; StopIteration at the end of the parent."""
        while True:
            example = self._read()
            self._report.num_seen += 1
            if "_bad" not in example:
                return example
            self._bad_ids.append(example["_bad"])
            self._bad_reasons.append(example["_reason"])
            self._report.add_bad(example["_bad"], example["_reason"])
            if self._report.num_seen >= self._min_seen:
                self._report.check(self._max_bad_fraction, "records read by a data worker")

    def _with_skips(self, batch: dict) -> dict:
        batch["_skipped_ids"] = np.asarray(self._bad_ids, dtype=object)
        batch["_skipped_reasons"] = np.asarray(self._bad_reasons, dtype=object)
        self._bad_ids, self._bad_reasons = [], []
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)
        self._bad_ids, self._bad_reasons = [], []


class _SkipAndBatchIterator(_SkipBadIterator):
    """Batches of `batch_size` good examples. It buffers nothing between batches, so its
    state is exactly its parent's state."""

    def __init__(self, parent, max_bad_fraction, min_seen, batch_size, drop_remainder):
        super().__init__(parent, max_bad_fraction, min_seen)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder

    def __next__(self):
        good = []
        while len(good) < self._batch_size:
            try:
                good.append(self._next_good())
            except StopIteration:
                break
        if not good or (self._drop_remainder and len(good) < self._batch_size):
            raise StopIteration
        return self._with_skips(_stack(good))


class _SkipAndPackIterator(_SkipBadIterator):
    """Packed batches (packing.BatchPacker). A batch closes when an arriving example fits in
    no row; that example is carried over and starts the next batch. The state is the
    parent's state from before the carried example was read, and `set_state` drops the
    carry, so a restored iterator reads it again and yields the same batches. At the end of
    the data the last batch is yielded partly filled (its shapes are fixed anyway).

    Grain's FirstFitPackIterDataset is not used: it concatenates every feature along its
    first axis into single rows, whereas a batch here keeps per-example slots (alignment
    texts, images, bookkeeping) and the bad-record reports of the examples it consumed.
    """

    def __init__(self, parent, max_bad_fraction, min_seen, pack_shape, padding_example):
        super().__init__(parent, max_bad_fraction, min_seen)
        self._packer = BatchPacker(*pack_shape, padding_example)
        self._carry = None  # (parent state before reading it, example)
        self._state_before_read = None

    def _read(self) -> dict:
        # Per read, not per good example: skipped records before the carried one stay
        # reported with the batch they closed and are not read again after a restore.
        self._state_before_read = copy.deepcopy(self._parent.get_state())
        return next(self._parent)

    def __next__(self):
        if self._carry is not None:
            placed = self._packer.add(self._carry[1])
            assert placed, "an empty batch holds any one example"
            self._carry = None
        while True:
            try:
                example = self._next_good()
            except StopIteration:
                break
            if not self._packer.add(example):
                self._carry = (self._state_before_read, example)
                break
        if not len(self._packer):
            raise StopIteration
        return self._with_skips(self._packer.pop_batch())

    def get_state(self):
        return self._carry[0] if self._carry is not None else self._parent.get_state()

    def set_state(self, state):
        super().set_state(state)
        self._carry = None
        self._packer.clear()


class _SkipAndBatchDataset(grain.IterDataset):
    """Batches with `iterator_cls` (one of the two above) built on each parent iterator."""

    def __init__(self, parent, iterator_cls, *args):
        super().__init__(parent)
        self._iterator_cls = iterator_cls
        self._args = args

    def __iter__(self):
        return self._iterator_cls(self._parent.__iter__(), *self._args)


# ------------------------------------------------------------------------------------------
# The iterator handed to the trainer


class HostBatchIterator:
    """Yields host batches (dicts of numpy arrays with `batch_keys(cfg)`), tracks bad records.

    `get_state()` / `set_state()` give a JSON-serializable state for checkpoints.
    `report` lists skipped records (id, reason); `stats` counts examples, skips, caption
    fallbacks and truncations seen by this process.
    """

    def __init__(self, dataset: grain.IterDataset, cfg: DataConfig, source_report=None):
        self._dataset = dataset
        self._iter = iter(dataset)
        self._cfg = cfg
        # Records dropped when the source was opened, and those skipped while reading.
        self.source_report = source_report or BadRecordReport()
        self.report = BadRecordReport()
        self.stats = {"examples": 0, "skipped": 0, "caption_fallbacks": 0, "truncated": 0}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        # Plain ndarrays (views of Grain's shared-memory buffers when workers are used).
        batch = {k: np.asarray(v) for k, v in next(self._iter).items()}
        skipped = batch.pop("_skipped_ids", np.zeros(0, object))
        reasons = batch.pop("_skipped_reasons", np.zeros(0, object))
        valid = batch["example_mask"].astype(bool)
        for record_id, reason in zip(skipped, reasons):
            self.report.add_bad(str(record_id), str(reason))
            log.warning("skipped record %s: %s", record_id, reason)
        self.report.num_seen += len(skipped) + int(valid.sum())
        self.stats["examples"] += int(valid.sum())
        self.stats["skipped"] += len(skipped)
        self.stats["caption_fallbacks"] += int(batch.pop("_caption_fallback")[valid].sum())
        self.stats["truncated"] += int(batch.pop("_truncated")[valid].sum())
        self.last_indices = batch.pop("_index")  # [B], or [B, K] when packed (-1: no example)
        if self.report.num_seen >= self._cfg.min_seen_before_check:
            self.report.check(self._cfg.max_bad_fraction)
        return batch

    @property
    def bad_records(self) -> list[tuple[str, str]]:
        """(id, reason) of the bad records found so far (capped at 1000 each stage)."""
        return self.source_report.examples + self.report.examples

    def get_state(self) -> dict:
        return self._iter.get_state()

    def set_state(self, state: dict):
        self._iter.set_state(state)

    def close(self):
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()


def _per_process_view(ds: grain.MapDataset, process_index: int, process_count: int):
    """Every `process_count`-th element from `process_index`, equal counts per process."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    per_process = len(ds) // process_count
    if per_process == 0:
        raise BadDataError(f"{len(ds)} records cannot feed {process_count} processes")
    return ds[process_index : per_process * process_count : process_count]


def _ensure_flags_parsed():
    """Grain's worker processes read absl flags; outside an absl app use their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _finish(ds: grain.MapDataset, processor, cfg: DataConfig, drop_remainder: bool):
    ds = ds.map(processor)
    examples_per_batch = cfg.batch_size * (cfg.examples_per_row if cfg.packing else 1)
    iter_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=2 * examples_per_batch)
    )
    skip = (cfg.max_bad_fraction, cfg.min_seen_before_check)
    if cfg.packing:
        shape = (cfg.batch_size, cfg.max_len, cfg.images_per_row, cfg.examples_per_row)
        iter_ds = _SkipAndBatchDataset(iter_ds, _SkipAndPackIterator, *skip, shape,
                                       processor.padding_example())
    else:
        iter_ds = _SkipAndBatchDataset(iter_ds, _SkipAndBatchIterator, *skip, cfg.batch_size,
                                       drop_remainder)
    if cfg.worker_count > 0:
        _ensure_flags_parsed()
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
    return iter_ds


def _process_info(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def make_train_iterator(
    cfg: DataConfig,
    tokenizer,
    process_index: int | None = None,
    process_count: int | None = None,
    source=None,
) -> HostBatchIterator:
    """Training batches for this process (shuffled, repeated, bad records skipped; packed
    when cfg.packing)."""
    process_index, process_count = _process_info(process_index, process_count)
    source = make_source(cfg) if source is None else source
    ds = grain.MapDataset.source(_SafeRead(source))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    ds = _per_process_view(ds, process_index, process_count)
    dataset = _finish(ds, ExampleProcessor(cfg, tokenizer), cfg, drop_remainder=True)
    return HostBatchIterator(dataset, cfg, getattr(source, "report", None))


# Past the end of the eval records. Not None: Grain drops None elements, which would
# leave the last batch short instead of padded.
_EVAL_PADDING = "__eval_padding__"


class _EvalRead:
    """This process's eval records in order; past the end: padding (index -1)."""

    def __init__(self, source, process_index, process_count, length):
        self.source = _SafeRead(source)
        self.process_index = process_index
        self.process_count = process_count
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, position):
        index = self.process_index + position * self.process_count
        if index >= len(self.source):
            return _EVAL_PADDING
        return self.source[index]


class _EvalProcessor:
    def __init__(self, processor: ExampleProcessor):
        self.processor = processor

    def __call__(self, item):
        if isinstance(item, str) and item == _EVAL_PADDING:
            return self.processor.padding_example()
        example = self.processor(item)
        if "_bad" in example:
            # Keep the row (masked) so eval stays aligned with its question list.
            log.warning("eval record %s unusable: %s", example["_bad"], example["_reason"])
            padded = self.processor.padding_example()
            padded["_index"] = np.int32(item[0])
            return padded
        return example


def make_eval_iterator(
    cfg: DataConfig,
    tokenizer,
    process_index: int | None = None,
    process_count: int | None = None,
    source=None,
) -> HostBatchIterator:
    """One pass in order; every process yields the same number of batches.

    The batch's rows come from global record indices process_index + k * process_count;
    `iterator.last_indices` gives them for the batch just returned (-1 for padding rows,
    whose example_mask is 0; rows whose record failed to decode also have example_mask 0).
    """
    process_index, process_count = _process_info(process_index, process_count)
    source = make_source(cfg) if source is None else source
    per_process = -(-len(source) // process_count)
    length = -(-per_process // cfg.batch_size) * cfg.batch_size
    ds = grain.MapDataset.source(_EvalRead(source, process_index, process_count, length))
    processor = _EvalProcessor(ExampleProcessor(cfg, tokenizer))
    # Nothing is dropped in eval, and rows stay aligned with the question list (unpacked).
    eval_cfg = cfg.replace(max_bad_fraction=0.999999, packing=False)
    dataset = _finish(ds, processor, eval_cfg, drop_remainder=False)
    return HostBatchIterator(dataset, eval_cfg, getattr(source, "report", None))


# ------------------------------------------------------------------------------------------
# Host batch -> global jax.Arrays
