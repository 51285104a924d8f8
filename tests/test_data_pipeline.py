"""Grain pipeline: contract shapes, exact resume in a new process, per-process shards,
bad records skipped and reported, eval padding, deterministic subsets, global arrays."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from test_data_fixtures import make_records, make_tokenizer, small_config, write_dataset

from exgra_jax.data.conversation import ConversationTokenizer
from exgra_jax.data.pipeline import (
    BATCH_KEYS,
    ExampleProcessor,
    make_eval_iterator,
    make_global_batch,
    make_train_iterator,
)
from exgra_jax.data.sources import BadDataError, JsonSource, subset_indices

HERE = os.path.dirname(os.path.abspath(__file__))
N = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("pipe"))
    tok = make_tokenizer(directory)
    return directory, write_dataset(directory, N), tok


def _drain(iterator, n=None):
    out = []
    while n is None or len(out) < n:
        try:
            out.append(next(iterator))
        except StopIteration:
            break
    return out


def test_batches_follow_the_contract(data):
    directory, path, tok = data
    cfg = small_config(directory, path, num_epochs=1, shuffle=False)
    batches = _drain(make_train_iterator(cfg, tok, 0, 1))
    assert len(batches) == N // cfg.batch_size
    b = batches[0]
    assert set(b) == set(BATCH_KEYS)
    shapes = {k: v.shape for k, v in b.items()}
    B = cfg.batch_size
    assert shapes["input_ids"] == shapes["labels"] == shapes["attention_mask"] == (B, 96)
    assert shapes["pixel_values"] == (B, 16, 16, 3) and b["pixel_values"].dtype == np.float32
    assert shapes["response_ids"] == (B, 16) and shapes["caption_ids"] == (B, 24)
    assert all(v.dtype == np.int32 for k, v in b.items() if k != "pixel_values")
    # Unshuffled row 0 is record 0: compare with processing it directly.
    records = make_records(N)
    ct = ConversationTokenizer(tok, cfg.template, cfg.num_image_tokens, cfg.mm_use_im_start_end)
    ref = ct.tokenize_conversation(records[0]["conversations"], True, cfg.max_len)
    np.testing.assert_array_equal(b["input_ids"][0], ref.input_ids)
    np.testing.assert_array_equal(b["labels"][0], ref.labels)
    cap, cap_mask = ct.answers(records[1]["conversations_long"], cfg.caption_len)
    np.testing.assert_array_equal(b["caption_ids"][1], cap)
    # Record 0 has no conversations_long: its caption falls back to the answers (counted).
    fallback, _ = ct.answers(records[0]["conversations"], cfg.caption_len)
    np.testing.assert_array_equal(b["caption_ids"][0], fallback)
    resp, _ = ct.answers(records[2]["conversations"], cfg.response_len)
    np.testing.assert_array_equal(b["response_ids"][2], resp)
    assert b["has_image"].all() and b["example_mask"].all()


def test_epochs_cover_data_and_reshuffle(data):
    directory, path, tok = data
    cfg = small_config(directory, path, num_epochs=2, batch_size=6)
    it = make_train_iterator(cfg, tok, 0, 1)
    batches = _drain(it)
    assert len(batches) == 2 * N // 6
    first = [tuple(r) for b in batches[:4] for r in b["input_ids"]]
    second = [tuple(r) for b in batches[4:] for r in b["input_ids"]]
    assert sorted(first) == sorted(second) and len(set(first)) == N  # each epoch: all once
    assert first != second  # a new order each epoch
    assert it.stats["caption_fallbacks"] == 2 * 6  # ids 0, 4, 8, ... lack conversations_long


def test_two_processes_read_disjoint_shards_covering_the_data(data):
    directory, path, tok = data
    cfg = small_config(directory, path, num_epochs=1, batch_size=3)
    rows = []
    for p in range(2):
        batches = _drain(make_train_iterator(cfg, tok, p, 2))
        assert len(batches) == N // 2 // 3
        rows.append({tuple(r) for b in batches for r in b["input_ids"]})
    assert not rows[0] & rows[1]
    assert len(rows[0] | rows[1]) == N


def _save_batches(batches, out):
    np.savez(out, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_in_new_process_is_bit_exact(data, tmp_path, workers):
    directory, path, tok = data
    cfg = small_config(directory, path, worker_count=workers)  # repeats forever
    k, n = 3, 5
    it = make_train_iterator(cfg, tok, 0, 1)
    _drain(it, k)
    state = it.get_state()
    expected = _drain(it, n)  # the uninterrupted run
    it.close()
    state_path = tmp_path / "state.json"
    state_path.write_text(json.dumps(state))  # must be JSON-serializable for checkpoints
    out = tmp_path / "resumed.npz"
    cmd = [sys.executable, os.path.join(HERE, "test_data_fixtures.py"), "resume", directory,
           path, str(state_path), str(out), str(n), str(workers)]
    subprocess.run(cmd, check=True, timeout=240)
    resumed = np.load(out)
    for i, batch in enumerate(expected):
        for key, value in batch.items():
            np.testing.assert_array_equal(resumed[f"{i}/{key}"], value, err_msg=f"{i}/{key}")
            assert resumed[f"{i}/{key}"].dtype == value.dtype


def _salted_dataset(directory, num_bad_images, num_missing, num_malformed):
    """Writes a data set whose first records are broken in the three ways."""
    path = write_dataset(directory, N)
    with open(path) as f:
        records = json.load(f)
    bad = {}
    for i in range(num_bad_images):
        with open(os.path.join(directory, "images", records[i]["image"]), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n truncated")
        bad[records[i]["id"]] = "decode"
    for i in range(num_bad_images, num_bad_images + num_missing):
        records[i]["image"] = "nowhere.png"
        bad[records[i]["id"]] = "not found"
    for i in range(num_bad_images + num_missing, num_bad_images + num_missing + num_malformed):
        records[i]["conversations"] = [] if i % 2 else [{"from": "human"}]
        bad[records[i]["id"]] = "malformed turn" if i % 2 == 0 else "empty"
    with open(path, "w") as f:
        json.dump(records, f)
    return path, bad


def test_bad_records_are_skipped_and_reported(tmp_path, data):
    _, _, tok = data
    directory = str(tmp_path)
    path, bad = _salted_dataset(directory, 2, 1, 2)
    # Unshuffled, so the bad records (the first five) are all read before the left-over.
    cfg = small_config(directory, path, num_epochs=1, batch_size=2, max_bad_fraction=0.3,
                       shuffle=False)
    it = make_train_iterator(cfg, tok, 0, 1)
    batches = _drain(it)
    assert it.source_report.num_bad == 0  # malformed records, too, are found when read
    # 24 - 5 bad = 19 good -> 9 full batches of 2 (one left over, dropped).
    assert len(batches) == 9
    reported = dict(it.bad_records)
    assert set(reported) == set(bad)
    for record_id, kind in bad.items():
        assert kind in reported[record_id]
    good_ids = {f"rec{i:04d}" for i in range(N)} - set(bad)
    records = {r["id"]: r for r in make_records(N)}
    ct = ConversationTokenizer(tok, cfg.template, cfg.num_image_tokens, cfg.mm_use_im_start_end)
    expected = {tuple(ct.tokenize_conversation(records[i]["conversations"], True,
                                               cfg.max_len).input_ids) for i in good_ids}
    seen = {tuple(r) for b in batches for r in b["input_ids"]}
    assert seen <= expected and len(seen) == 18


def test_mostly_bad_data_stops_with_clear_error(tmp_path, data):
    _, _, tok = data
    # Missing files and malformed records: the source opens (nothing is checked per record
    # at start-up); reading stops once more than 20% of the records read are bad.
    d1 = tmp_path / "a"
    d1.mkdir()
    path, _ = _salted_dataset(str(d1), 0, 10, 6)
    assert len(JsonSource(path, str(d1 / "images"))) == N
    cfg = small_config(str(d1), path, batch_size=2, max_bad_fraction=0.2,
                       min_seen_before_check=8)
    with pytest.raises(BadDataError, match=r"more than 20\.0% .*rec00\d\d"):
        _drain(make_train_iterator(cfg, tok, 0, 1), 20)
    # Corrupt images: caught while reading.
    d2 = tmp_path / "b"
    d2.mkdir()
    path, _ = _salted_dataset(str(d2), 16, 0, 0)
    cfg = small_config(str(d2), path, batch_size=2, max_bad_fraction=0.2,
                       min_seen_before_check=8, shuffle=False)
    with pytest.raises(BadDataError, match=r"more than 20\.0% .*rec00"):
        _drain(make_train_iterator(cfg, tok, 0, 1), 20)


def test_eval_pads_last_batch_and_keeps_order(data):
    directory, path, tok = data
    cfg = small_config(directory, path, batch_size=5)
    seen = []
    for p in range(2):
        it = make_eval_iterator(cfg, tok, p, 2)
        batches = []
        indices = []
        for b in it:
            batches.append(b)
            indices.append(it.last_indices)
        assert len(batches) == 3  # ceil(12 / 5), the same on both processes
        mask = np.concatenate([b["example_mask"] for b in batches])
        idx = np.concatenate(indices)
        assert mask.sum() == 12 and (mask[12:] == 0).all()
        np.testing.assert_array_equal(idx[:12], np.arange(p, N, 2))
        assert (idx[12:] == -1).all()
        pad_rows = batches[-1]["attention_mask"][mask[10:] == 0]
        assert (pad_rows == 0).all()
        seen += list(idx[:12])
    assert sorted(seen) == list(range(N))


def test_fraction_selects_a_deterministic_subset(data):
    a, b = subset_indices(1000, 0.1, seed=3), subset_indices(1000, 0.1, seed=3)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 100 and len(np.unique(a)) == 100
    assert not np.array_equal(a, subset_indices(1000, 0.1, seed=4))
    directory, path, _ = data
    src = JsonSource(path, os.path.join(directory, "images"), fraction=0.25, seed=1)
    assert len(src) == 6
    assert [src[i]["id"] for i in range(len(src))] == [f"rec{i:04d}"
                                                       for i in subset_indices(N, 0.25, 1)]


def test_global_batch_is_sharded_on_the_batch_axes(data):
    directory, path, tok = data
    cfg = small_config(directory, path, batch_size=8, num_epochs=1)
    host = next(make_train_iterator(cfg, tok, 0, 1))
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("data", "fsdp"))
    batch = make_global_batch(host, mesh)
    assert set(batch) == set(BATCH_KEYS)
    for key, value in batch.items():
        assert value.shape == host[key].shape
        np.testing.assert_array_equal(np.asarray(value), host[key])
        assert len(value.addressable_shards) == 8
        assert value.addressable_shards[0].data.shape[0] == 1


def test_config_errors(data):
    directory, path, tok = data
    with pytest.raises(ValueError, match="json_paths or tfds_name"):
        small_config(directory, path, json_paths=())
    with pytest.raises(ValueError, match="image tokens"):
        ExampleProcessor(small_config(directory, path, max_len=8, num_image_tokens=4), tok)
    with pytest.raises(ValueError, match="process_index"):
        make_train_iterator(small_config(directory, path), tok, 2, 2)


def test_opening_a_source_touches_no_image_file(tmp_path, data):
    directory, path, tok = data
    # An image folder that does not exist: opening still succeeds (no per-image checks at
    # start-up); every record then fails when read, and the pipeline stops, naming them.
    src = JsonSource(path, str(tmp_path / "no_such_folder"))
    assert len(src) == N and src.report.num_bad == 0
    cfg = small_config(directory, path, image_folder=str(tmp_path / "no_such_folder"),
                       num_epochs=1, batch_size=2, min_seen_before_check=4)
    with pytest.raises(BadDataError, match=r"image file not found: .*no_such_folder"):
        _drain(make_train_iterator(cfg, tok, 0, 1), 3)


def _escaping_dataset(directory):
    """Records 0-1: missing images; 2-4: names leading outside the image folder."""
    path = write_dataset(directory, N)
    images = os.path.join(directory, "images")
    with open(path) as f:
        records = json.load(f)
    for i in (0, 1):
        os.remove(os.path.join(images, records[i]["image"]))
    outside = os.path.join(directory, "outside.png")
    os.replace(os.path.join(images, records[2]["image"]), outside)
    os.symlink(outside, os.path.join(images, "link.png"))
    records[2]["image"] = "../outside.png"
    records[3]["image"] = outside  # absolute
    records[4]["image"] = "link.png"  # a symlink out of the folder
    with open(path, "w") as f:
        json.dump(records, f)
    return path, {records[i]["id"] for i in (0, 1)}, {records[i]["id"] for i in (2, 3, 4)}


def test_missing_and_escaping_images_are_counted_skips(tmp_path, data):
    _, _, tok = data
    directory = str(tmp_path)
    path, missing, escaping = _escaping_dataset(directory)
    cfg = small_config(directory, path, num_epochs=1, batch_size=2, shuffle=False,
                       max_bad_fraction=0.3)
    it = make_train_iterator(cfg, tok, 0, 1)
    batches = _drain(it)
    assert it.source_report.num_bad == 0  # nothing was checked at start-up
    assert it.stats["skipped"] == 5 and it.stats["examples"] == 2 * len(batches) == N - 5 - 1
    reasons = dict(it.bad_records)
    assert set(reasons) == missing | escaping
    for record_id in missing:
        assert "image file not found" in reasons[record_id]
    for record_id in escaping:
        assert "outside the image folder" in reasons[record_id]
    # With the flag, the three escaping names are read (the same picture for each).
    allowed = cfg.replace(allow_outside_image_folder=True)
    it = make_train_iterator(allowed, tok, 0, 1)
    batches = _drain(it)
    assert dict(it.bad_records).keys() == missing and it.stats["skipped"] == 2
    first = batches[0]["pixel_values"]  # rows 0-1 are records 2 and 3: the outside image
    np.testing.assert_array_equal(first[0], first[1])
