"""Compile the real train step for TPU topologies on a CPU-only machine (ahead of time).

    python tools/aot_compile.py --config=configs/stage2_7b.py --topology=v5e-64 \
        [--topology=v4-32,v5p-64 ...] [--config.train.micro_batches=2 ...]

For each topology, libtpu describes the chips (``jax.experimental.topologies``), the trainer
builds its mesh over those compile-only devices, and the jitted train step is lowered with
abstract, sharded state and batch (nothing is allocated) and compiled by the TPU compiler.
Printed per topology, per device: argument, output, aliased (donated), temporary and code
bytes, the peak (argument + output - alias + temp + code) against the chip's HBM, and the
compiled FLOPs of one step (XLA cost analysis, summed over devices; the decoder is compiled
unrolled at 1 and 2 layers to count every layer, see ``unrolled_flops``; --noflops_pass
skips that) against the analytic count (``trainer.flops_per_step``: 6 N per token, no
remat recompute). The last line is one JSON object with every figure.

A topology that fails (the mesh does not fit it, the batch does not split, the compiler runs
out of HBM) gets a row saying why; the others still compile. Data paths and the tokenizer in
the config are ignored: only shapes matter here.
"""

from __future__ import annotations

import os

# Before jax loads: the host backend stays CPU (no TPU here), and libtpu is loaded only as
# a compiler, so it must not insist on owning the machine's TPU lock or query GCE metadata.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

GIB = 1024**3


# ============================================================================ topologies
@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice as libtpu names it. Names follow Cloud TPU: v4-N and v5p-N count
    TensorCores (two per chip, fused into one megacore device), v5e-N and v6e-N chips."""

    name: str  # libtpu topology, e.g. "v5e:8x8"
    chip_config: str  # "megacore" (v4, v5p) | "default"
    hbm_gib: float  # per chip (= per JAX device)
    wrap: tuple[bool, bool, bool] = (False, False, False)  # torus links per dimension
    chips_per_host: tuple[int, int, int] = (2, 2, 1)


_V5E = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_V4 = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8"}
_TORUS_3D = (True, True, True)

TOPOLOGIES: dict[str, Topology] = {}
for _n, _shape in _V5E.items():
    _wrap = (True, True, False) if _n == 256 else (False, True, False) if _n == 128 else \
        (False, False, False)
    TOPOLOGIES[f"v5e-{_n}"] = Topology(f"v5e:{_shape}", "default", 16.0, _wrap)
    TOPOLOGIES[f"v6e-{_n}"] = Topology(f"v6e:{_shape}", "default", 32.0, _wrap)
for _n, _shape in _V4.items():
    _wrap = _TORUS_3D if _n >= 128 else (False, False, False)
    TOPOLOGIES[f"v4-{_n}"] = Topology(f"v4:{_shape}", "megacore", 32.0, _wrap)
    TOPOLOGIES[f"v5p-{_n}"] = Topology(f"v5:{_shape}", "megacore", 95.0, _wrap)


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """Compile-only devices of a named topology (e.g. 'v5e-64')."""
    from jax.experimental import topologies  # noqa: PLC0415

    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; known: {', '.join(TOPOLOGIES)}")
    t = TOPOLOGIES[topology]
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=t.name, chip_config_name=t.chip_config,
        chips_per_host_bounds=t.chips_per_host, num_slices=num_slices, wrap=t.wrap)
    return list(desc.devices)


# ============================================================================ abstract inputs
def aot_config(config) -> ml_collections.ConfigDict:
    """The config with everything that touches files cleared: only shapes are compiled."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.json_paths = ()
    c.data.image_folder = ""
    c.tokenizer = ""
    c.eval.json_paths = ()
    return c


def batch_shapes(config, mcfg) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Global shape and dtype of every batch array (the pipeline's host-batch contract:
    one example per row, or packed rows with K example slots and I images per row)."""
    from exgra_jax.data.pipeline import BATCH_KEYS, PACKED_BATCH_KEYS  # noqa: PLC0415

    b, d = config.train.global_batch_size, config.data
    s = mcfg.image_size
    packed = bool(d.get("packing", False))
    per_row = (d.examples_per_row,) if packed else ()  # example slots
    images = (d.images_per_row,) if packed else ()
    shapes = {
        "input_ids": ((b, d.max_len), jnp.int32),
        "attention_mask": ((b, d.max_len), jnp.int32),
        "labels": ((b, d.max_len), jnp.int32),
        "pixel_values": ((b, *images, s, s, 3), jnp.float32),
        "has_image": ((b, *per_row), jnp.int32),
        "response_ids": ((b, *per_row, d.response_len), jnp.int32),
        "response_mask": ((b, *per_row, d.response_len), jnp.int32),
        "caption_ids": ((b, *per_row, d.caption_len), jnp.int32),
        "caption_mask": ((b, *per_row, d.caption_len), jnp.int32),
        "example_mask": ((b, *per_row), jnp.int32),
    }
    if packed:
        shapes.update(segment_ids=((b, d.max_len), jnp.int32),
                      positions=((b, d.max_len), jnp.int32),
                      image_segment_ids=((b, *images), jnp.int32))
    keys = PACKED_BATCH_KEYS if packed else BATCH_KEYS
    if set(shapes) != set(keys):
        raise RuntimeError(f"batch keys {sorted(shapes)} differ from the pipeline's "
                           f"{sorted(keys)}; update tools/aot_compile.py")
    return shapes


def abstract_inputs(run, config):
    """(state, batch) as ShapeDtypeStructs carrying the train step's input shardings."""
    from exgra_jax import parallel  # noqa: PLC0415

    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         run.abstract_state, run.state_sharding)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype,
                                     sharding=parallel.batch_sharding(run.mesh, len(shape)))
             for k, (shape, dtype) in batch_shapes(config, run.model).items()}
    return state, batch


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
    return total


def global_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ============================================================================ compile
def compile_train_step(config, devices, hbm_bytes: float, total_steps: int = 1000,
                       flops_pass: bool = True, log=lambda s: None) -> dict:
    """Lower and compile the train step over ``devices``; the figures as a dict.

    ``flops_pass`` adds two small compiles that count the FLOPs of every layer (see
    ``unrolled_flops``); without it the FLOPs are those of the scanned program as XLA
    reports them (loop bodies counted once)."""
    from exgra_jax.train import trainer  # noqa: PLC0415

    config = aot_config(config)
    t0 = time.time()
    run, compiled = _compile(config, devices, total_steps)
    t1 = time.time()
    log(f"  train step compiled in {t1 - t0:.0f} s")
    mem = compiled.memory_analysis()
    n = len(devices)
    state, batch = abstract_inputs(run, config)
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    analytic = trainer.step_flops(config, run)
    scanned_flops = _flops(compiled) * n
    if flops_pass:
        log("  counting FLOPs: decoder unrolled at 1 and 2 layers ...")
    compiled_flops = unrolled_flops(config, devices, total_steps) if flops_pass else None
    t2 = time.time()
    shown = compiled_flops if compiled_flops is not None else scanned_flops
    return {
        "devices": n,
        "mesh": dict(run.mesh.shape),
        "global_batch": config.train.global_batch_size,
        "micro_batches": config.train.micro_batches,
        "per_device_batch": config.train.global_batch_size // config.train.micro_batches
        // (run.mesh.shape["data"] * run.mesh.shape["fsdp"]),
        "remat": run.model.remat_policy,
        "alignment": run.alignment is not None,
        "params_bytes": global_bytes(state["params"]),
        "params_bytes_per_device": per_device_bytes(state["params"]),
        "state_bytes_per_device": per_device_bytes(state),
        "batch_bytes_per_device": per_device_bytes(batch),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "code_bytes": int(mem.generated_code_size_in_bytes),
        "peak_bytes": int(peak),
        "hbm_bytes": int(hbm_bytes),
        "fits": bool(peak <= hbm_bytes),
        "compiled_flops": shown,
        "flops_source": "unrolled" if compiled_flops is not None else "scanned",
        "scanned_program_flops": scanned_flops,
        "analytic_flops": float(analytic),
        "flops_ratio": shown / analytic if analytic else float("nan"),
        # Packed rows hold a varying number of examples: the config's measured mean.
        "examples_per_step": trainer.examples_per_step(config),
        "tflops_per_example": shown / trainer.examples_per_step(config) / 1e12,
        "compile_s": round(t1 - t0, 1),
        "flops_pass_s": round(t2 - t1, 1),
    }


def _compile(config, devices, total_steps):
    from exgra_jax.train import trainer  # noqa: PLC0415

    run = trainer.build(config, total_steps, devices=devices)
    state, batch = abstract_inputs(run, config)
    # Flax's logical sharding constraints on activations apply only under a mesh context;
    # without it every activation would be left to the partitioner (and end up replicated).
    with jax.set_mesh(run.mesh):
        compiled = run.train_step.lower(state, batch).compile()
    return run, compiled


def _flops(compiled) -> float:
    """FLOPs of one device's program, as XLA's cost analysis counts them."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def unrolled_flops(config, devices, total_steps: int = 1000) -> float:
    """Compiled FLOPs of one step, summed over devices, with every loop counted.

    XLA's cost analysis counts the body of a while loop once, so the scanned decoder (and
    the micro-batch scan) would count one layer (one micro-batch). Here the step is compiled
    with the decoder unrolled at 1 and 2 layers and one micro-batch holding the whole batch,
    and the count is extended linearly to the configured depth (the layers are identical).
    """
    layers = config.model.num_layers
    counts = []
    for n in (1, 2):
        c = ml_collections.ConfigDict(config.to_dict())
        c.model.scan_layers = False
        c.model.num_layers = n
        c.train.micro_batches = 1
        counts.append(_flops(_compile(c, devices, total_steps)[1]) * len(devices))
    return counts[0] + (layers - 1) * (counts[1] - counts[0])


def explain_failure(err: Exception) -> str:
    """One readable line for a failed topology."""
    msg = str(err).strip()
    if "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg:
        first = next((ln for ln in msg.splitlines() if "memory" in ln.lower()), msg)
        return ("does not fit in HBM (the TPU compiler says: " + first.strip()[:300] + "); "
                "try remat_policy=full, more micro_batches, or a larger mesh")
    return f"{type(err).__name__}: {msg.splitlines()[0][:400] if msg else ''}"


def run_topologies(config, topologies: list[str], total_steps: int = 1000,
                   flops_pass: bool = True, log=print) -> dict[str, dict]:
    """Compile for each topology; failures become {'error': ...} entries."""
    results = {}
    for name in topologies:
        try:
            devices = topology_devices(name, config.mesh.num_slices)
            hbm = TOPOLOGIES[name].hbm_gib * GIB
            log(f"[{name}] {len(devices)} devices ({devices[0].device_kind}); compiling ...")
            results[name] = compile_train_step(config, devices, hbm, total_steps,
                                               flops_pass, log)
        except Exception as e:  # noqa: BLE001 - one topology's failure must not stop the rest
            results[name] = {"error": explain_failure(e)}
        log(f"[{name}] " + (results[name].get("error") or "done"))
    return results


# ============================================================================ report
def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def format_table(results: dict[str, dict]) -> str:
    cols = ("topology", "mesh d/f/t", "batch/dev x micro", "remat", "args GiB", "temp GiB",
            "out GiB", "alias GiB", "peak GiB", "HBM GiB", "fits", "compiled PFLOP",
            "counted", "analytic PFLOP", "ratio", "examples", "TFLOP/example", "compile s")
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append((name, "failed: " + r["error"]))
            continue
        m = r["mesh"]
        rows.append((
            name, f"{m['data']}/{m['fsdp']}/{m['tensor']}",
            f"{r['per_device_batch']} x {r['micro_batches']}", r["remat"],
            _gib(r["argument_bytes"]), _gib(r["temp_bytes"]), _gib(r["output_bytes"]),
            _gib(r["alias_bytes"]), _gib(r["peak_bytes"]), _gib(r["hbm_bytes"]),
            "yes" if r["fits"] else "NO", f"{r['compiled_flops'] / 1e15:.3f}",
            r["flops_source"], f"{r['analytic_flops'] / 1e15:.3f}", f"{r['flops_ratio']:.3f}",
            f"{r['examples_per_step']:.0f}", f"{r['tflops_per_example']:.1f}", f"{r['compile_s']}",
        ))
    widths = [max(len(str(row[i])) for row in [cols, *rows] if len(row) > i)
              for i in range(len(cols))]
    line = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths))  # noqa: E731
    out = [line(cols), line(["-" * w for w in widths])]
    for row in rows:
        out.append(line(row) if len(row) == len(cols) else f"{row[0].ljust(widths[0])}  {row[1]}")
    return "\n".join(out)


# ============================================================================ main
def main(argv=None) -> int:
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config_flag = config_flags.DEFINE_config_file("config", None, "Training config file.")
    topo_flag = flags.DEFINE_list("topology", ["v5e-64"],
                                  f"TPU topologies, comma-separated; known: {list(TOPOLOGIES)}")
    steps_flag = flags.DEFINE_integer("total_steps", 1000, "Steps of the LR schedule.")
    flops_flag = flags.DEFINE_bool(
        "flops_pass", True, "Also compile the decoder unrolled at 1 and 2 layers to count "
        "every layer's FLOPs (XLA counts a scanned loop body once).")
    flags.mark_flag_as_required("config")
    status = {}

    def _main(unused_argv):
        results = run_topologies(config_flag.value, topo_flag.value, steps_flag.value,
                                 flops_flag.value,
                                 log=lambda s: print(s, file=sys.stderr, flush=True))
        print(format_table(results))
        config_file = config_flags.get_config_filename(flags.FLAGS["config"])
        print(json.dumps({"config": config_file, "results": results}))
        status["rc"] = 0 if all("error" not in r for r in results.values()) else 1

    return run_main(_main, argv, status)


def run_main(main_fn, argv, status: dict) -> int:
    """absl's app.run without its exit on success: the exit code ``main_fn`` leaves in
    ``status['rc']`` (1 if it did not get that far), so tests can call ``main``."""
    from absl import app  # noqa: PLC0415

    try:
        app.run(main_fn, argv=argv)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    return status.get("rc", 1)


if __name__ == "__main__":
    sys.exit(main())
