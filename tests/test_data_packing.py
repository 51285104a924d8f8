"""Packed training batches: the contract, every example packed once and intact (checked
against the unpacked pipeline on the same records and seed), first fit in arrival order,
images in segment order, exact resume (in process and with a worker), bad records under
packing, validation errors."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from test_data_fixtures import WORDS, make_tokenizer

from exgra_jax.data.packing import real_token_share
from exgra_jax.data.pipeline import (
    BATCH_KEYS,
    PACKED_BATCH_KEYS,
    DataConfig,
    make_eval_iterator,
    make_source,
    make_train_iterator,
)

N = 30
B, T, IMGS, K = 3, 192, 2, 3  # rows, tokens, images and examples per row


def _records(n: int, seed: int = 0) -> list[dict]:
    """Varied lengths; every 4th record is text-only, every 5th lacks a long caption."""
    rng = np.random.default_rng(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))) + "."

    records = []
    for i in range(n):
        image = i % 4 != 0
        turns = [{"from": "human", "value": ("<image>\n" if image else "") + words(3, 10)},
                 {"from": "gpt", "value": words(1, 30)}]
        if i % 3 == 0:
            turns += [{"from": "human", "value": words(3, 8)},
                      {"from": "gpt", "value": words(1, 12)}]
        long_turns = [dict(turns[0]), {"from": "gpt", "value": words(10, 20)}]
        records.append({"id": f"r{i:03d}", "image": f"img_{i:03d}.png" if image else None,
                        "conversations": turns,
                        "conversations_long": long_turns if i % 5 else None})
    return records


def _write(directory: str, records: list[dict]) -> str:
    rng = np.random.default_rng(1)
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    for r in records:
        if r["image"]:
            pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(directory, "images", r["image"]))
    path = os.path.join(directory, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def _config(directory, path, **overrides) -> DataConfig:
    fields = dict(json_paths=(path,), image_folder=os.path.join(directory, "images"),
                  max_len=T, response_len=16, caption_len=24, image_size=16,
                  num_image_tokens=4, batch_size=B, seed=3, packing=True,
                  images_per_row=IMGS, examples_per_row=K)
    fields.update(overrides)
    return DataConfig(**fields)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("packing"))
    tok = make_tokenizer(directory)
    return directory, _write(directory, _records(N)), tok


def _drain(iterator, n=None):
    out = []
    while n is None or len(out) < n:
        try:
            out.append((next(iterator), iterator.last_indices))
        except StopIteration:
            break
    return out


@pytest.fixture(scope="module")
def epoch(data):
    """One shuffled epoch, packed and unpacked (same seed, so the same arrival order)."""
    directory, path, tok = data
    cfg = _config(directory, path, num_epochs=1)
    packed = _drain(make_train_iterator(cfg, tok, 0, 1))
    # N is a multiple of the unpacked batch size, so no example is dropped there.
    unpacked = _drain(make_train_iterator(cfg.replace(packing=False, batch_size=5), tok, 0, 1))
    arrival, examples = [], {}
    for batch, indices in unpacked:
        for row, index in enumerate(indices):
            arrival.append(int(index))
            examples[int(index)] = {k: v[row] for k, v in batch.items()}
    return cfg, packed, arrival, examples


def test_packed_batches_follow_the_contract(epoch):
    cfg, packed, _, examples = epoch
    batch, indices = packed[0]
    assert tuple(batch) == PACKED_BATCH_KEYS  # bookkeeping keys are popped by the iterator
    shapes = {k: v.shape for k, v in batch.items()}
    for key in ("input_ids", "labels", "attention_mask", "segment_ids", "positions"):
        assert shapes[key] == (B, T)
    assert shapes["pixel_values"] == (B, IMGS, 16, 16, 3)
    assert batch["pixel_values"].dtype == np.float32
    assert shapes["image_segment_ids"] == (B, IMGS)
    assert shapes["has_image"] == shapes["example_mask"] == indices.shape == (B, K)
    assert shapes["response_ids"] == shapes["response_mask"] == (B, K, 16)
    assert shapes["caption_ids"] == shapes["caption_mask"] == (B, K, 24)
    assert all(v.dtype == np.int32 for k, v in batch.items() if k != "pixel_values")
    # Packing several examples per row is the point: fewer padding slots than unpacked.
    assert max(b["example_mask"].sum(1).max() for b, _ in packed) >= 2
    unpacked_share = np.mean([e["attention_mask"].mean() for e in examples.values()])
    packed_share = np.mean([real_token_share(b) for b, _ in packed[:-1]])
    assert packed_share > 1.5 * unpacked_share


def _segments(batch, row):
    """[(segment id, start, stop)] of a row's runs of equal nonzero segment ids."""
    seg = batch["segment_ids"][row]
    edges = np.flatnonzero(np.diff(np.r_[0, seg, 0]) != 0)
    runs = [(int(seg[a]), int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if seg[a]]
    return runs


def test_every_example_is_packed_once_intact_in_its_own_segment(data, epoch):
    pad_id = data[2].pad_token_id
    _, packed, _, examples = epoch
    # Text-only examples carry the processor's blank() image.
    blank = next(e for e in examples.values() if not e["has_image"])["pixel_values"]
    seen = []
    for batch, indices in packed:
        for r in range(B):
            runs = _segments(batch, r)
            used = int(batch["example_mask"][r].sum())
            # Segments 1..used, in order, one run each: no segment is split or repeated.
            assert [s for s, _, _ in runs] == list(range(1, used + 1))
            assert (batch["example_mask"][r] == (np.arange(K) < used)).all()
            empty = batch["segment_ids"][r] == 0
            assert (batch["attention_mask"][r][empty] == 0).all()
            assert (batch["labels"][r][empty] == -100).all()
            assert (batch["positions"][r][empty] == 0).all()
            assert (batch["input_ids"][r][empty] == pad_id).all()
            image_segments = []
            for s, start, stop in runs:
                index = int(indices[r, s - 1])
                seen.append(index)
                ref = examples[index]
                n = int(ref["attention_mask"].sum())
                assert stop - start == n  # the whole example sits in this row
                for key in ("input_ids", "labels", "attention_mask"):
                    np.testing.assert_array_equal(batch[key][r, start:stop], ref[key][:n])
                np.testing.assert_array_equal(batch["positions"][r, start:stop], np.arange(n))
                for key in ("has_image", "response_ids", "response_mask", "caption_ids",
                            "caption_mask"):
                    np.testing.assert_array_equal(batch[key][r, s - 1], ref[key], err_msg=key)
                if ref["has_image"]:
                    image_segments.append((s, ref["pixel_values"]))
            # Images in segment order, then blanks with segment id 0.
            ids = batch["image_segment_ids"][r]
            assert list(ids[: len(image_segments)]) == [s for s, _ in image_segments]
            assert (ids[len(image_segments):] == 0).all()
            for j, (_, pixels) in enumerate(image_segments):
                np.testing.assert_array_equal(batch["pixel_values"][r, j], pixels)
            for j in range(len(image_segments), IMGS):
                np.testing.assert_array_equal(batch["pixel_values"][r, j], blank)
            assert (indices[r, used:] == -1).all() and (batch["has_image"][r, used:] == 0).all()
            assert (batch["response_mask"][r, used:] == 0).all()
    assert sorted(seen) == list(range(N))


def _first_fit(arrival, examples):
    """The rule written out: each arriving example goes to the first row with room for its
    tokens, image and slot; when none has room the batch closes and it starts the next.
    Returns the batches as lists of rows of indices."""
    batches = []
    for index in arrival:
        n = int(examples[index]["attention_mask"].sum())
        im = int(examples[index]["has_image"])
        for _ in range(2):
            if batches:
                rows, tokens, images = batches[-1]
                fits = [r for r in range(B) if tokens[r] + n <= T and images[r] + im <= IMGS
                        and len(rows[r]) < K]
                if fits:
                    rows[fits[0]].append(index)
                    tokens[fits[0]] += n
                    images[fits[0]] += im
                    break
            batches.append(([[] for _ in range(B)], [0] * B, [0] * B))
    return [rows for rows, _, _ in batches]


def test_first_fit_in_arrival_order(epoch):
    _, packed, arrival, examples = epoch
    got = [[[int(i) for i in row if i >= 0] for row in indices] for _, indices in packed]
    assert got == _first_fit(arrival, examples)
    assert len(packed) >= 4  # several batches close by overflow


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for i, ((x, xi), (y, yi)) in enumerate(zip(a, b)):
        assert list(x) == list(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"{i}/{key}")
            assert x[key].dtype == y[key].dtype
        np.testing.assert_array_equal(xi, yi)


BAD = {"r001": "decode", "r002": "not found", "r006": "malformed"}


@pytest.fixture(scope="module")
def salted(data, tmp_path_factory):
    """The records with a corrupt image, a missing one and a malformed conversation."""
    directory = str(tmp_path_factory.mktemp("salted"))
    records = _records(N)
    path = _write(directory, records)
    with open(os.path.join(directory, "images", records[1]["image"]), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    records[2]["image"] = "nowhere.png"
    records[6]["conversations"] = [{"from": "human"}]
    with open(path, "w") as f:
        json.dump(records, f)
    return directory, path, records


def _skipped_while(iterator, n):
    """The next n batches, and how many bad records the iterator reported meanwhile."""
    before = iterator.stats["skipped"]
    batches = _drain(iterator, n)
    return batches, iterator.stats["skipped"] - before


@pytest.mark.parametrize("workers,salted_data", [(0, False), (1, False), (0, True)])
def test_resume_mid_epoch_is_bit_identical(data, salted, workers, salted_data):
    directory, path, tok = data
    if salted_data:
        directory, path, _ = salted
    cfg = _config(directory, path, worker_count=workers, max_bad_fraction=0.3)  # endless
    first, more = 3, 8
    it = make_train_iterator(cfg, tok, 0, 1)
    _drain(it, first)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected, skipped = _skipped_while(it, more)  # the uninterrupted run
    it.close()
    resumed_it = make_train_iterator(cfg, tok, 0, 1)
    _drain(resumed_it, 1)  # a restore replaces whatever the iterator held
    resumed_it.set_state(state)
    resumed, resumed_skipped = _skipped_while(resumed_it, more)
    resumed_it.close()
    _assert_same_batches(resumed, expected)
    # Bad records are reported once, with the batch whose reads met them.
    assert resumed_skipped == skipped and (skipped > 0) == salted_data


def test_bad_records_are_skipped_and_reported_under_packing(data, salted):
    directory, path, records = salted
    cfg = _config(directory, path, num_epochs=1, max_bad_fraction=0.3, min_seen_before_check=4)
    it = make_train_iterator(cfg, data[2], 0, 1)
    packed = _drain(it)
    reported = dict(it.bad_records)
    assert set(reported) == set(BAD)
    assert "decode" in reported["r001"] and "not found" in reported["r002"]
    # Indices are the source's; the malformed record is found when it is read.
    source = make_source(cfg)
    seen = [source[int(i)]["id"] for _, indices in packed for i in indices.ravel() if i >= 0]
    good = [r for r in records if r["id"] not in BAD]
    assert sorted(seen) == [r["id"] for r in good]
    # The stats count used slots only: every good example, each caption fallback; the
    # three bad records were skipped while reading.
    assert it.stats["examples"] == len(good) and it.stats["skipped"] == len(BAD)
    fallbacks = sum(r["conversations_long"] is None for r in good)
    assert it.stats["caption_fallbacks"] == fallbacks


def test_eval_stays_unpacked(data):
    directory, path, tok = data
    cfg = _config(directory, path, batch_size=4)
    batch = next(make_eval_iterator(cfg, tok, 0, 1))
    assert tuple(batch) == BATCH_KEYS and batch["input_ids"].shape == (4, T)


def test_packing_validation_errors(data):
    directory, path, tok = data
    with pytest.raises(ValueError, match="examples_per_row=2 < images_per_row=3.*raise "
                                         "examples_per_row"):
        _config(directory, path, images_per_row=3, examples_per_row=2)
    # 6 image tokens with <im_start>/<im_end>: at most 32 image blocks in 192 tokens.
    with pytest.raises(ValueError, match=r"images_per_row <= 32"):
        _config(directory, path, images_per_row=33, examples_per_row=40)
    with pytest.raises(ValueError, match="images_per_row must be positive"):
        _config(directory, path, images_per_row=0)
    with pytest.raises(ValueError, match="examples_per_row must be positive"):
        _config(directory, path, examples_per_row=0)
    # Unpacked, the per-row limits are not used.
    _config(directory, path, packing=False, images_per_row=3, examples_per_row=2)
