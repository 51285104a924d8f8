"""JSON sources open from a byte-span index built once per file: the records and the
`fraction` subset are those of parsing the whole file (json.load), malformed records are
found when read, and a remote (gs://) file is read through a local copy."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_gcs_workdir import emulator  # noqa: F401  (a GCS emulator on 127.0.0.1)

from exgra_jax.data import sources
from exgra_jax.data.sources import JsonSource, RecordError, scan_json_list

# Strings that hold JSON's structural characters, escapes and multi-byte UTF-8.
AWKWARD = [
    {"id": "a", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\n\"quoted\" ], [ {brace} \\ back"},
        {"from": "gpt", "value": "Lésion à droite, 肺结节 \u2028 \U0001F600"}]},
    [1, 2, {"nested": [[], {}]}],
    "a string, with ] and [",
    None,
    {"id": "b", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt",
                                                                  "value": "a"}]},
]


@pytest.mark.parametrize("dump", [
    lambda v: json.dumps(v),
    lambda v: json.dumps(v, ensure_ascii=False, indent=2),
    lambda v: " \n[" + " ,\r\n\t".join(json.dumps(x, ensure_ascii=False) for x in v) + "] \n",
])
def test_spans_cut_out_each_element_as_json_load_reads_it(dump):
    data = dump(AWKWARD).encode("utf-8")
    spans = scan_json_list(data, "t.json")
    assert [json.loads(data[a:b]) for a, b in spans] == json.loads(data)
    assert scan_json_list(b" [ ] ", "empty.json").shape == (0, 2)


@pytest.mark.parametrize("bad", [b'{"id": 1}', b"[1, 2", b"[1 2]", b"[1], [2]", b'[{"a": }]'])
def test_a_file_that_is_not_a_json_list_is_refused(bad):
    with pytest.raises(ValueError, match="bad.json"):
        scan_json_list(bad, "bad.json")


def _records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "image": f"img{i % 3}.png",
             "conversations": [{"from": "human", "value": f"<image>\nq{i} é"},
                               {"from": "gpt", "value": f"a{i}"}]} for i in range(n)]


def _write(path, records) -> str:
    with open(path, "w") as f:
        json.dump(records, f, ensure_ascii=False)
    return str(path)


def test_records_and_subset_are_those_of_parsing_the_whole_files(tmp_path):
    first, second = _write(tmp_path / "a.json", _records(30)), _write(tmp_path / "b.json",
                                                                      _records(45)[30:])
    folder = str(tmp_path / "images")
    src = JsonSource([first, second], folder, fraction=0.4, seed=7,
                     cache_dir=str(tmp_path / "cache"))
    # The reference: both files parsed whole, concatenated, and the subset rule written out
    # (round(fraction * n) indices of a seeded permutation, in file order).
    everything = json.load(open(first)) + json.load(open(second))
    chosen = np.sort(np.random.default_rng(7).permutation(45)[:18])
    assert len(src) == 18
    for k, i in enumerate(chosen):
        got, want = src[k], everything[i]
        assert got["id"] == want["id"] and got["conversations"] == want["conversations"]
        assert got["image"] == os.path.join(folder, want["image"])


def test_index_is_built_once_per_file_version(tmp_path, monkeypatch):
    path, cache = _write(tmp_path / "d.json", _records(12)), str(tmp_path / "cache")
    assert len(JsonSource(path, cache_dir=cache)) == 12

    def no_parse(*_):
        raise AssertionError("the JSON file was scanned again")

    with monkeypatch.context() as m:
        m.setattr(sources, "scan_json_list", no_parse)
        src = JsonSource(path, cache_dir=cache)
        assert [src[i]["id"] for i in range(len(src))] == [f"r{i}" for i in range(12)]
    # A changed file (other size and time) is indexed again, never read with stale spans.
    _write(tmp_path / "d.json", _records(20)[::-1])
    src = JsonSource(path, cache_dir=cache)
    assert [src[i]["id"] for i in range(len(src))] == [f"r{i}" for i in range(20)][::-1]


def test_malformed_records_are_found_when_read_with_their_id(tmp_path):
    records = _records(6)
    records[1]["conversations"] = []
    records[3] = ["not", "a", "record"]
    records[4]["conversations"] = [{"from": "human"}]
    src = JsonSource(_write(tmp_path / "m.json", records), cache_dir=str(tmp_path / "c"))
    assert len(src) == 6 and src.report.num_bad == 0  # nothing checked at start-up
    bad = {}
    for i in range(6):
        try:
            src[i]
        except RecordError as e:
            bad[e.record_id] = str(e)
    assert set(bad) == {"r1", "#3", "r4"}
    assert "not an object" in bad["#3"]


def test_an_empty_list_is_a_clear_error(tmp_path):
    with pytest.raises(sources.BadDataError, match="no records"):
        JsonSource(_write(tmp_path / "e.json", []), cache_dir=str(tmp_path / "c"))


def test_a_gs_json_file_is_read_through_a_local_copy(emulator, tmp_path):  # noqa: F811
    records = _records(9)
    emulator.blob("data/gs.json").upload_from_string(json.dumps(records, ensure_ascii=False))
    cache = tmp_path / "cache"
    src = JsonSource(f"gs://{emulator.name}/data/gs.json", "/images", cache_dir=str(cache))
    assert [src[i]["conversations"] for i in range(len(src))] == [r["conversations"]
                                                                  for r in records]
    assert len(list(cache.glob("gs.json.*.json"))) == 1  # the copy lives in the cache
