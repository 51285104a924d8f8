"""tools/aot_compile.py: the real train step of a tiny config compiled by libtpu for a
4-chip v5e slice on this CPU machine; its memory figures agree with what the architecture
and the sharding imply, its FLOPs with the analytic count."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

pytest.importorskip("libtpu")

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "aot_compile", os.path.join(ROOT, "tools", "aot_compile.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


aot = _load_tool()


def tiny_stage2(batch=8, micro_batches=2):
    """Stage 2 in miniature: alignment on, both text branches through the LLM, full remat,
    bf16 compute, gradient accumulation."""
    from exgra_jax.train.defaults import base_config  # noqa: PLC0415

    c = base_config("tiny", dtype="bfloat16", remat_policy="full")
    c.data.max_len, c.data.response_len, c.data.caption_len = 32, 8, 12
    c.data.json_paths = ("/nonexistent/ignored.json",)  # the tool ignores data files
    c.alignment.k = 2
    c.alignment.graph_scope = "global"
    c.alignment.text_branch = "llm"
    c.train.global_batch_size = batch
    c.train.micro_batches = micro_batches
    c.mesh.fsdp = -1
    return c


def parameter_count(c) -> tuple[int, int]:
    """(all parameters, trainable ones) of ``c``, counted from the architecture: the CLIP
    ViT (patch conv without bias, class and position embeddings, pre and post LayerNorm;
    per layer two LayerNorms, four biased attention projections, a biased two-layer MLP),
    the mlp2x_gelu projector, LLaMA (untied embedding and head, bias-free grouped-query
    attention and SwiGLU, two RMSNorms per layer and a final one) and the alignment GNN (per
    GraphConv layer a root and a neighbour kernel and a bias). The vision tower is frozen."""
    m = c.model
    w, f, d = m.vision_width, m.vision_mlp, m.hidden_size
    q = m.num_heads * (d // m.num_heads)
    kv = m.num_kv_heads * (d // m.num_heads)
    patches = (m.image_size // m.patch_size) ** 2
    vision = (3 * m.patch_size ** 2 * w + w + (patches + 1) * w + 2 * 2 * w
              + m.vision_layers * (2 * 2 * w + 4 * (w * w + w) + (w * f + f) + (f * w + w)))
    projector = (w * d + d) + (d * d + d)
    llm = 2 * m.vocab_size * d + d + m.num_layers * (
        2 * d * q + 2 * d * kv + 3 * d * m.mlp_size + 2 * d)
    gnn = c.alignment.gnn_layers * (2 * d * d + d)
    return vision + projector + llm + gnn, projector + llm + gnn


@pytest.fixture(scope="module")
def figures():
    return aot.run_topologies(tiny_stage2(), ["v5e-4"], total_steps=10, log=lambda s: None)


@pytest.mark.slow
def test_compiles_for_v5e_4_with_consistent_memory(figures):
    r = figures["v5e-4"]
    assert "error" not in r, r.get("error")
    assert r["devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert r["alignment"] and r["remat"] == "full" and r["micro_batches"] == 2
    assert r["per_device_batch"] == 1
    total, trainable = parameter_count(tiny_stage2())
    # float32 master weights, although the step computes in bfloat16.
    assert r["params_bytes"] == 4 * total
    # The state (the weights and Adam's two float32 moments of the trainable ones) is split
    # over the 4 fsdp devices: a quarter each, plus the few vectors too short to split
    # (measured 1.07x; replicated it would be 4x).
    state_share = 4 * (total + 2 * trainable) / r["devices"]
    assert state_share <= r["state_bytes_per_device"] <= 1.15 * state_share
    params_share = 4 * total / r["devices"]
    assert params_share <= r["params_bytes_per_device"] <= 1.15 * params_share
    # Arguments hold the device's shard of the state and batch (TPU tiles pad small arrays).
    assert r["argument_bytes"] >= r["state_bytes_per_device"] + r["batch_bytes_per_device"]
    # The state is donated: outputs reuse all of its buffers.
    assert r["state_bytes_per_device"] <= r["alias_bytes"] <= min(r["argument_bytes"],
                                                                  r["output_bytes"])
    assert r["temp_bytes"] > 0 and r["code_bytes"] > 0
    # The peak holds the arguments, the temporaries and the code at once; outputs written
    # into donated buffers are not counted twice.
    resident = r["argument_bytes"] + r["temp_bytes"] + r["code_bytes"]
    assert resident <= r["peak_bytes"] < resident + r["output_bytes"]
    assert r["hbm_bytes"] == 16 * 1024**3 and r["fits"]


@pytest.mark.slow
def test_flops_count_every_layer_and_match_the_analytic_count(figures):
    r = figures["v5e-4"]
    assert r["flops_source"] == "unrolled"
    # The scanned program counts one decoder layer and one micro-batch only.
    assert r["compiled_flops"] > r["scanned_program_flops"] > 0
    # 6N per token plus attention, against what XLA compiled: full remat adds a forward
    # pass of the decoder (about 8N/6N), the frozen tower and the alignment a little more.
    assert 1.0 < r["flops_ratio"] < 1.8, r["flops_ratio"]
    table = aot.format_table(figures)
    assert "v5e-4" in table and f"{r['compiled_flops'] / 1e15:.3f}" in table


def test_failures_are_reported_per_topology():
    c = tiny_stage2()
    c.mesh.fsdp, c.mesh.tensor = -1, 3
    out = aot.run_topologies(c, ["v5e-4", "v9-1"], log=lambda s: None)
    assert "does not divide the 4 devices" in out["v5e-4"]["error"]
    assert "unknown topology 'v9-1'" in out["v9-1"]["error"]
    assert "failed:" in aot.format_table(out)


def test_topology_names_map_to_devices_and_hbm():
    assert len(aot.topology_devices("v5e-8")) == 8
    assert len(aot.topology_devices("v4-32")) == 16  # v4-N counts TensorCores: N/2 chips
    assert aot.TOPOLOGIES["v5p-64"].hbm_gib == 95.0
    assert aot.TOPOLOGIES["v4-32"].hbm_gib == 32.0


def test_out_of_memory_message_names_the_fixes():
    err = RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on "
                       "HBM, the total memory required (19.80G) exceeds available (15.75G).")
    msg = aot.explain_failure(err)
    assert "does not fit in HBM" in msg and "19.80G" in msg and "micro_batches" in msg
