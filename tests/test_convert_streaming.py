"""to-hf streams a checkpoint leaf by leaf: the export equals the one written from the whole
restored tree, file for file and byte for byte, while each parameter leaf is read once and
released before the next is read. Loading Hugging Face weights releases each host array as
it is placed."""

from __future__ import annotations

import json
import os
import sys
import weakref

import jax
import numpy as np
import pytest

from exgra_jax.checkpoint import Checkpointer, param_shapes
from exgra_jax.convert import hf
from exgra_jax.eval.checkpoint_loading import restore_model_params
from exgra_jax.models import config as mc
from exgra_jax.workdir import CHECKPOINTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_checkpoint  # noqa: E402  (tools/ is not a package)

SHARD = 40_000  # bytes: the export spreads over several files


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A step-3 checkpoint of a random scanned tiny model (params only)."""
    config = mc.tiny(scan_layers=True, num_layers=3)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                          jax.eval_shape(lambda: hf.unflatten(hf.abstract_params(config))))
    directory = str(tmp_path_factory.mktemp("run"))
    ckpt = Checkpointer(os.path.join(directory, CHECKPOINTS), async_save=False)
    state = {"params": {"model": params}}
    ckpt.save(3, state, None, {"model": config.to_dict(),
                               "param_shapes": param_shapes(state["params"])}, force=True)
    ckpt.close()
    return directory, config


def _files(directory: str) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory))}


def test_streamed_export_equals_the_whole_tree_export(workdir, tmp_path, monkeypatch):
    directory, config = workdir
    restored = []  # the number of leaves of each restore to-hf asks orbax for
    restore = Checkpointer.restore_params

    def counting_restore(self, step, abstract):
        restored.append(len(jax.tree.leaves(abstract)))
        return restore(self, step, abstract)

    monkeypatch.setattr(Checkpointer, "restore_params", counting_restore)
    streamed = convert_checkpoint.to_hf(directory, str(tmp_path / "streamed"), None, "bfloat16")
    monkeypatch.undo()
    assert restored == [1] * len(hf.abstract_params(config))
    params, step = restore_model_params(directory, config, None, None)
    assert step == 3
    whole = str(tmp_path / "whole")
    hf.save_llava(config, params, whole, dtype="bfloat16")
    assert _files(streamed) == _files(whole)
    assert "model.safetensors" in _files(whole)


def test_each_leaf_is_read_once_and_released_before_the_next(workdir, tmp_path):
    directory, config = workdir
    params, _ = restore_model_params(directory, config, None, None)
    flat = hf.flatten(params)
    reads, alive = [], []

    def read_leaf(path):
        assert not [r for r in alive if r() is not None], f"a leaf is still held at {path}"
        reads.append(path)
        leaf = np.array(flat[path])  # a fresh array, so that its lifetime can be watched
        alive.append(weakref.ref(leaf))
        return leaf

    out = str(tmp_path / "sharded")
    hf.write_llava(config, {p: x.shape for p, x in flat.items()}, read_leaf, out,
                   max_shard_bytes=SHARD)
    assert sorted(reads) == sorted(flat) and len(reads) == len(set(reads))
    weight_map = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    assert len(set(weight_map.values())) > 2
    # The same tensors as the whole tree in one file.
    hf.save_llava(config, params, str(tmp_path / "one"))
    single = hf.CheckpointReader(str(tmp_path / "one"))
    sharded = hf.CheckpointReader(out)
    assert sorted(single.keys()) == sorted(sharded.keys())
    for name in single.keys():
        np.testing.assert_array_equal(sharded.get(name), single.get(name), err_msg=name)


def test_hf_weights_are_placed_leaf_by_leaf_each_host_copy_released(monkeypatch):
    """from-hf (and every HF init source) holds the weights once: each host array is
    released as it is placed on the devices (kept to compare: the whole tree held until
    every leaf is placed fails this)."""
    from exgra_jax.eval import checkpoint_loading
    from exgra_jax.models.llava import abstract_params
    from exgra_jax.parallel import DEFAULT_RULES, make_mesh
    from exgra_jax.train.defaults import base_config

    config = base_config("tiny")
    config.init.source = "llava_hf"
    mcfg = mc.ModelConfig.from_dict(config.model.to_dict())
    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                        abstract_params(mcfg))
    refs = [weakref.ref(x) for x in jax.tree.leaves(host)]
    given = [host]  # handed over once: the loader's caller then holds the only reference
    del host
    monkeypatch.setattr(checkpoint_loading, "hf_model_params", lambda c, m: given.pop())
    done = []  # (weakref to a placed host array, its device copy)
    put = jax.device_put

    def aliased(host: np.ndarray, placed: jax.Array) -> bool:
        """Whether a device shard lies in ``host``'s buffer (on CPU, jax may place a host
        array, or slices of it, without copying: then the weights are held once)."""
        start = host.ctypes.data
        return any(start <= s.data.unsafe_buffer_pointer() < start + host.nbytes
                   for s in placed.addressable_shards)

    def held_twice() -> int:
        """Placed weights whose host array is still alive beside a separate device copy."""
        return sum(r() is not None and not aliased(r(), out) for r, out in done)

    def counting_put(x, *args, **kwargs):
        loaded = [r for r in refs if r() is x]
        # The runtime may hold the last host array a little after its copy: one at most.
        assert not loaded or held_twice() <= 1, "placed weights are still held on the host"
        # Waited for: the runtime holds a host array until its transfer is done.
        out = put(x, *args, **kwargs).block_until_ready()
        done.extend((r, out) for r in loaded)
        return out

    monkeypatch.setattr(jax, "device_put", counting_put)
    mesh = make_mesh(dict(data=1, fsdp=-1, tensor=1))
    placed = checkpoint_loading.init_source_model_params(config, mcfg, mesh,
                                                         [tuple(r) for r in DEFAULT_RULES])
    n = len(refs)
    assert len(done) == n and held_twice() <= 1
    assert len(jax.tree.leaves(placed)) == n
