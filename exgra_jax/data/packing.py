"""Packed host batches: several examples per row of `max_len` tokens, first fit in arrival order.

A packed batch has B rows of T tokens; each row holds at most K examples (segments 1..K) and
at most I images. Per-example features (alignment inputs, bookkeeping) sit in K slots per
row: slot k is the row's segment k+1; unused slots hold the padding example's values with
example_mask 0. Pure numpy; the Grain iterator that drives `BatchPacker` is in pipeline.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Keys of a packed host batch (the data contract with the model side).
PACKED_BATCH_KEYS = (
    "input_ids",  # [B, T]
    "labels",  # [B, T]
    "attention_mask",  # [B, T]
    "segment_ids",  # [B, T] 1..K, 0 on empty slots
    "positions",  # [B, T] 0.. restarting per segment, 0 on empty slots
    "pixel_values",  # [B, I, H, W, 3] in segment order, then blank images
    "image_segment_ids",  # [B, I] segment of each image, 0 for blank ones
    "has_image",  # [B, K]
    "example_mask",  # [B, K]
    "response_ids",  # [B, K, Tr]
    "response_mask",  # [B, K, Tr]
    "caption_ids",  # [B, K, Tc]
    "caption_mask",  # [B, K, Tc]
)
# Token-aligned keys copied from each example (its real tokens only).
_TOKEN_KEYS = ("input_ids", "labels", "attention_mask")
# Per-example keys laid out in [B, K, ...] slots, bookkeeping included.
_SLOT_KEYS = ("has_image", "example_mask", "response_ids", "response_mask", "caption_ids",
              "caption_mask", "_caption_fallback", "_truncated", "_index")


def real_token_share(batch: dict) -> float:
    """Fraction of the batch's LM token slots that hold real tokens (padding excluded)."""
    mask = np.asarray(batch["attention_mask"])
    return float(mask.sum()) / mask.size


def num_tokens(example: dict) -> int:
    """Real tokens of a processed (right-padded) example."""
    return int(np.asarray(example["attention_mask"]).sum())


@dataclass
class _Row:
    examples: list = field(default_factory=list)
    tokens: int = 0
    images: int = 0


class BatchPacker:
    """Places examples into the B rows of one batch by first fit in arrival order.

    `add` returns False when an example fits in no row (tokens, images or examples per row
    would overflow): the batch is then complete, and the caller starts the next batch with it.
    """

    def __init__(self, batch_size: int, max_len: int, images_per_row: int,
                 examples_per_row: int, padding_example: dict):
        self.batch_size = batch_size
        self.max_len = max_len
        self.images_per_row = images_per_row
        self.examples_per_row = examples_per_row
        self._padding = padding_example
        self._rows = [_Row() for _ in range(batch_size)]

    def __len__(self) -> int:
        """Examples placed so far."""
        return sum(len(r.examples) for r in self._rows)

    def add(self, example: dict) -> bool:
        n, images = num_tokens(example), int(example["has_image"])
        for row in self._rows:
            if (row.tokens + n <= self.max_len and row.images + images <= self.images_per_row
                    and len(row.examples) < self.examples_per_row):
                row.examples.append(example)
                row.tokens += n
                row.images += images
                return True
        return False

    def clear(self):
        self._rows = [_Row() for _ in range(self.batch_size)]

    def pop_batch(self) -> dict:
        """The packed batch of the examples placed so far (PACKED_BATCH_KEYS + bookkeeping)."""
        batch = self._empty_batch()
        for r, row in enumerate(self._rows):
            start = image = 0
            for k, example in enumerate(row.examples):
                n = num_tokens(example)
                span = slice(start, start + n)
                for key in _TOKEN_KEYS:
                    batch[key][r, span] = example[key][:n]
                batch["segment_ids"][r, span] = k + 1
                batch["positions"][r, span] = np.arange(n)
                if example["has_image"]:
                    batch["pixel_values"][r, image] = example["pixel_values"]
                    batch["image_segment_ids"][r, image] = k + 1
                    image += 1
                for key in _SLOT_KEYS:
                    batch[key][r, k] = example[key]
                start += n
        self.clear()
        return batch

    def _empty_batch(self) -> dict:
        pad = self._padding
        rows, slots = (self.batch_size,), (self.batch_size, self.examples_per_row)

        def tiled(value, lead):
            value = np.asarray(value)
            return np.broadcast_to(value, lead + value.shape).copy()

        batch = {key: tiled(pad[key][0], rows + (self.max_len,)) for key in _TOKEN_KEYS}
        batch["segment_ids"] = np.zeros(rows + (self.max_len,), np.int32)
        batch["positions"] = np.zeros(rows + (self.max_len,), np.int32)
        batch["pixel_values"] = tiled(pad["pixel_values"], rows + (self.images_per_row,))
        batch["image_segment_ids"] = np.zeros(rows + (self.images_per_row,), np.int32)
        batch.update({key: tiled(pad[key], slots) for key in _SLOT_KEYS})
        return batch
