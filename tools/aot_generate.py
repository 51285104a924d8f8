"""Compile evaluation-time generation for TPU topologies on a CPU-only machine (ahead of time).

    python tools/aot_generate.py --config=configs/finetune_vqa_rad_7b.py --topology=v5e-64 \
        [--prompt_len=384 --max_new_tokens=32 --batch=0]

Evaluation (``launch/eval.py``, best-step selection while fine-tuning) generates on the
training mesh with the parameters sharded by the training rules, nothing gathered onto one
host or chip. This compiles the two programs it runs — the prefill (prompt into the KV
cache, first token) and the decode loop — for the config's mesh over a TPU topology, with
abstract sharded parameters and inputs, and prints each program's per-device memory (the
peak: arguments + outputs - donated + temporaries + code) against the chip's HBM. The batch
is ``config.eval.batch_size`` unless ``--batch`` is given. The last line is one JSON object.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from aot_compile import GIB, TOPOLOGIES, aot_config, run_main, topology_devices  # noqa: E402


def _peak(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    return {"argument_bytes": int(m.argument_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes), "peak_bytes": int(peak)}


def compile_generation(config, devices, batch: int, prompt_len: int, max_new: int) -> dict:
    """Per-device memory of the prefill and decode programs on the config's mesh."""
    from jax.sharding import NamedSharding, PartitionSpec

    from exgra_jax import parallel
    from exgra_jax.inference import generate as g
    from exgra_jax.models.config import ModelConfig

    mcfg = ModelConfig.from_dict(config.model.to_dict())
    m = config.mesh
    mesh = parallel.make_mesh(dict(data=m.data, fsdp=m.fsdp, tensor=m.tensor), devices=devices)
    rules = g._rules_tuple(config.rules)
    shardings = g.param_shardings(mcfg, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          jax.eval_shape(lambda: _init(mcfg)), shardings)
    axes = g._batch_axes(mesh, rules)

    def arg(shape, dtype):
        spec = PartitionSpec(axes or None, *([None] * (len(shape) - 1)))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    s = mcfg.image_size
    ids, mask = arg((batch, prompt_len), jnp.int32), arg((batch, prompt_len), jnp.int32)
    pixels = arg((batch, s, s, 3), jnp.float32)
    gen = g.GenerationConfig(max_new_tokens=max_new, eos_token_ids=(2,), pad_token_id=0)
    static, knobs = g._split_config(gen)
    prefill, decode = g._programs(mcfg, static, mesh, rules)
    rng = jax.random.key(0)
    with g._sharding_context(mesh, rules):
        pre = prefill.lower(params, ids, mask, pixels, rng, knobs).compile()
        state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                             pre.out_info, pre.output_shardings)
        dec = decode.lower(params, state, rng, knobs, np.int32(max_new)).compile()
    per_device_params = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                            for x in jax.tree.leaves(params))
    return {"mesh": dict(mesh.shape), "batch": batch, "prompt_len": prompt_len,
            "max_new_tokens": max_new, "params_bytes_per_device": per_device_params,
            "prefill": _peak(pre), "decode": _peak(dec)}


def _init(mcfg):
    from exgra_jax.models.llava import init_params

    return init_params(mcfg, jax.random.key(0))


def main(argv=None) -> int:
    from absl import flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Training config file.")
    topo_flag = flags.DEFINE_list("topology", ["v5e-64"], f"known: {list(TOPOLOGIES)}")
    prompt_flag = flags.DEFINE_integer("prompt_len", 384, "Prompt tokens (image block included).")
    new_flag = flags.DEFINE_integer("max_new_tokens", 32, "Generated tokens.")
    batch_flag = flags.DEFINE_integer("batch", 0, "Global batch; 0: config.eval.batch_size.")
    flags.mark_flag_as_required("config")
    status = {}

    def _main(unused_argv):
        config = aot_config(config_flag.value)
        batch = batch_flag.value or config.eval.batch_size
        results = {}
        for name in topo_flag.value:
            devices = topology_devices(name, config.mesh.num_slices)
            r = compile_generation(config, devices, batch, prompt_flag.value, new_flag.value)
            r["hbm_bytes"] = int(TOPOLOGIES[name].hbm_gib * GIB)
            r["fits"] = max(r["prefill"]["peak_bytes"], r["decode"]["peak_bytes"]) <= r["hbm_bytes"]
            results[name] = r
        print(f"{'topology':<10} {'mesh d/f/t':<11} {'batch':>5} {'params/dev GiB':>15} "
              f"{'prefill peak GiB':>17} {'decode peak GiB':>16} {'HBM GiB':>8} fits")
        for name, r in results.items():
            mesh = r["mesh"]
            print(f"{name:<10} {mesh['data']}/{mesh['fsdp']}/{mesh['tensor']:<7} {r['batch']:>5} "
                  f"{r['params_bytes_per_device'] / GIB:>15.2f} "
                  f"{r['prefill']['peak_bytes'] / GIB:>17.2f} "
                  f"{r['decode']['peak_bytes'] / GIB:>16.2f} {r['hbm_bytes'] / GIB:>8.1f} "
                  f"{'yes' if r['fits'] else 'NO'}")
        print(json.dumps({"config": config_flags.get_config_filename(flags.FLAGS["config"]),
                          "results": results}))
        status["rc"] = 0

    return run_main(_main, argv, status)


if __name__ == "__main__":
    sys.exit(main())
