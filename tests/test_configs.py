"""The shipped 7B configs: they load, hold the documented values, their regexes pick the
intended parameters of the real 7B tree (abstract, never allocated), and bad settings get
errors that say what to change."""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import AbstractMesh

from exgra_jax import parallel
from exgra_jax.alignment.objective import AlignmentConfig
from exgra_jax.models.config import ModelConfig
from exgra_jax.train import state as st
from exgra_jax.train import trainer

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")
TRAIN_CONFIGS = ("stage1_7b", "stage2_7b", "finetune_vqa_rad_7b", "finetune_slake_7b",
                 "finetune_pathvqa_7b")
ALL_CONFIGS = (*TRAIN_CONFIGS, "zero_shot")

# name -> (lr, global batch in packed rows, epochs, alignment on)
DOCUMENTED = {
    "stage1_7b": (2e-3, 32, 1.0, False),
    "stage2_7b": (2e-5, 32, 3.0, True),
    "finetune_vqa_rad_7b": (2e-5, 16, 15.0, False),
    "finetune_slake_7b": (4e-5, 32, 15.0, False),
    "finetune_pathvqa_7b": (3e-5, 16, 15.0, False),
}
# name -> (images per row, examples per row, the padded recipe's batch, tensor ways): the
# packed batch holds between 1x and 1.5x the padded recipe's examples per step.
PACKED = {
    "stage1_7b": (5, 5, 128, 2),
    "stage2_7b": (4, 4, 64, 2),
    "finetune_vqa_rad_7b": (6, 6, 64, 4),
    "finetune_slake_7b": (6, 6, 128, 4),
    "finetune_pathvqa_7b": (6, 6, 64, 4),
}
TFDS_NAMES = {"finetune_vqa_rad_7b": "vqa_rad", "finetune_slake_7b": "slake",
              "finetune_pathvqa_7b": "path_vqa"}
IM_START, IM_END = 32002, 32003


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str, arg: str | None = None):
    return load_module(name).get_config(arg)


def without_files(config):
    """The config with its (placeholder) file paths cleared, so only settings are checked."""
    config.data.json_paths = ()
    config.data.image_folder = ""
    config.tokenizer = ""
    return config


def mesh_of(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), parallel.MESH_AXES)


@functools.lru_cache(maxsize=2)
def param_paths_7b(with_alignment: bool) -> dict[str, tuple[int, ...]]:
    """Every parameter path of the 7B model (and GNN) with its shape, via jax.eval_shape."""
    acfg = AlignmentConfig() if with_alignment else None
    _, boxed = trainer.abstract_boxed_params(ModelConfig(), acfg, 1)
    flat = traverse_util.flatten_dict(nn.unbox(boxed))
    return {"/".join(k): v.shape for k, v in flat.items()}


def selected(config) -> set[str]:
    acfg = trainer.alignment_config(config)
    shapes = param_paths_7b(acfg is not None)
    tree = traverse_util.unflatten_dict({tuple(k.split("/")): np.zeros(()) for k in shapes})
    mask = traverse_util.flatten_dict(
        st.trainable_mask(tree, config.train.trainable, config.train.frozen))
    return {"/".join(k) for k, v in mask.items() if v}


# --------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_loads_builds_model_and_documents_its_command(name):
    module = load_module(name)
    assert "python " in module.__doc__ and f"configs/{name}.py" in module.__doc__
    c = module.get_config()
    m = trainer.model_config(c)
    assert (m.hidden_size, m.num_layers, m.vocab_size, m.num_image_tokens) == (4096, 32, 32004, 256)
    assert (m.image_token_id, m.pad_token_id) == (32001, 32000)
    acfg = trainer.alignment_config(c)
    assert acfg is None or isinstance(acfg, AlignmentConfig)
    assert c.data.max_len == 2048 and c.data.fraction == 1.0
    assert c.mesh.fsdp == -1 and c.mesh.data == 1
    assert c.mesh.tensor == (PACKED[name][3] if name in PACKED else 1)


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_documented_training_values(name):
    c = load(name)
    lr, batch, epochs, align = DOCUMENTED[name]
    t = c.train
    assert (t.lr, t.global_batch_size, t.num_epochs) == (lr, batch, epochs)
    images, examples, padded_batch, _ = PACKED[name]
    d = c.data
    assert d.packing and (d.images_per_row, d.examples_per_row) == (images, examples)
    assert padded_batch <= trainer.examples_per_step(c) <= 1.5 * padded_batch
    # Steps come from the epochs over the examples a packed step holds.
    assert trainer.total_steps(c, 10_000) == int(epochs * 10_000 // trainer.examples_per_step(c))
    assert (trainer.alignment_config(c) is not None) == align
    # AdamW, no weight decay, 3% warmup then cosine to zero; CLIP frozen.
    assert t.weight_decay == 0.0 and t.schedule == "warmup_cosine" and t.warmup_frac == 0.03
    assert r"^model/vision_tower/" in t.frozen
    m = trainer.model_config(c)
    assert (m.dtype, m.param_dtype) == ("bfloat16", "float32")
    assert m.remat_policy != "none"
    t_run = c.train.copy_and_resolve_references()
    t_run.total_steps = 100
    schedule = st.learning_rate_schedule(t_run)
    assert float(schedule(0)) == 0.0
    assert float(schedule(3)) == pytest.approx(lr)
    assert float(schedule(100)) == pytest.approx(0.0, abs=lr * 1e-6)


def test_stage1_specifics():
    c = load("stage1_7b", "/data/med")
    assert c.init.source == "clip_llama"
    assert c.data.json_paths == ("/data/med/llava_med_alignment_500k.json",)
    assert c.data.image_folder == "/data/med/images"
    assert tuple(c.train.trainable_embedding_rows) == (IM_START, IM_END)


def test_stage2_specifics():
    c = load("stage2_7b")
    a = trainer.alignment_config(c)
    assert c.alignment.weight == 1.0 and a.blackbox_lambda == 80.0
    assert c.alignment.text_branch == "llm"
    assert c.alignment.text_pack_fraction == 0.0  # <= 4 examples per shard: little to pack
    assert c.init.source in ("llava_hf", "llava_med")


@pytest.mark.parametrize("name", sorted(TFDS_NAMES))
def test_finetune_specifics(name):
    c = load(name, "/tfds,/json")
    assert c.data.tfds_name == TFDS_NAMES[name] and c.data.tfds_data_dir == "/tfds"
    assert c.eval.select_metric == "mean(open_recall,closed_accuracy)"
    assert c.eval.json_paths[0].startswith("/json/")
    assert c.eval.candidates == "/json/candidate.json"


# --------------------------------------------------------------------------------- regexes
def test_stage1_trains_projector_and_two_embedding_rows_only():
    c = load("stage1_7b")
    chosen = selected(c)
    paths = param_paths_7b(False)
    projector = {p for p in paths if p.startswith("model/projector/")}
    assert projector and chosen == projector | {"model/llm/embed_tokens"}
    rows = st.embedding_row_mask({"model": {"llm": {"embed_tokens": jax.ShapeDtypeStruct(
        paths["model/llm/embed_tokens"], np.float32)}}}, c.train.trainable_embedding_rows)
    assert rows.shape == (32004, 1)
    assert np.flatnonzero(np.asarray(rows)).tolist() == [IM_START, IM_END]


def test_stage2_trains_llm_projector_and_gnn_not_clip():
    chosen = selected(load("stage2_7b"))
    paths = param_paths_7b(True)
    expect = {p for p in paths if re.match(r"model/(llm|projector)/|alignment/gnn/", p)}
    assert chosen == expect
    assert any(p.startswith("alignment/gnn/") for p in chosen)
    assert "model/llm/lm_head/kernel" in chosen and "model/llm/embed_tokens" in chosen
    assert not any(p.startswith("model/vision_tower/") for p in chosen)


@pytest.mark.parametrize("name", sorted(TFDS_NAMES))
def test_finetune_trains_llm_and_projector(name):
    chosen = selected(load(name))
    paths = param_paths_7b(False)
    assert chosen == {p for p in paths if re.match(r"model/(llm|projector)/", p)}


# --------------------------------------------------------------------------------- errors
def test_mesh_product_against_device_count_says_what_to_change():
    c = load("stage2_7b")
    c.mesh.fsdp, c.mesh.tensor = -1, 3
    with pytest.raises(ValueError, match=r"multiply to 3, which does not divide the 8 devices"):
        trainer.build(without_files(c), 10)
    c.mesh.fsdp, c.mesh.tensor = 2, 2
    with pytest.raises(ValueError, match=r"has 4 devices but 8 are available.*mesh\.fsdp=-1"):
        trainer.build(c, 10)


def test_stage2_validates_on_64_chips_with_tensor_2_and_256_with_tensor_8():
    c = without_files(load("stage2_7b"))
    m, a = trainer.model_config(c), trainer.alignment_config(c)
    trainer.validate(c, m, a, mesh_of(fsdp=32, tensor=2))
    trainer.validate(c, m, a, mesh_of(fsdp=32, tensor=8))
    with pytest.raises(ValueError, match=r"global_batch_size=32 must be divisible by the batch "
                                         r"shards \(mesh data x fsdp = 64\)"):
        trainer.validate(c, m, a, mesh_of(fsdp=64))


def test_packing_without_a_measured_mean_needs_total_steps():
    c = load("stage2_7b")
    c.data.mean_examples_per_row = 0.0
    with pytest.raises(ValueError, match=r"data\.mean_examples_per_row .* or train\.total_steps"):
        trainer.total_steps(c, 1000)
    c.train.total_steps = 7
    assert trainer.total_steps(c, 1000) == 7


def test_batch_not_divisible_by_shards_times_micro_batches():
    c = without_files(load("finetune_slake_7b"))
    c.train.micro_batches = 3
    m = trainer.model_config(c)
    with pytest.raises(ValueError, match=r"train\.global_batch_size=32.*batch shards \(mesh "
                                         r"data x fsdp = 8\).*train\.micro_batches=3"):
        trainer.validate(c, m, None, mesh_of(fsdp=8))


def test_max_len_too_short_for_image_tokens():
    c = without_files(load("stage1_7b"))
    c.data.max_len = 256  # 256 patches + <im_start>/<im_end> do not fit
    with pytest.raises(ValueError, match=r"data\.max_len=256 cannot hold the 258 image tokens; "
                                         r"raise data\.max_len"):
        trainer.validate(c, trainer.model_config(c), None, mesh_of(fsdp=8))


def test_alignment_graph_too_small_for_knn():
    c = without_files(load("stage2_7b"))
    c.alignment.graph_scope = "device"
    m, a = trainer.model_config(c), trainer.alignment_config(c)
    # One packed row of 4 example slots per batch shard: too few for k=5 neighbours.
    with pytest.raises(ValueError, match=r"graphs get 4 samples.*graph_scope='global'"):
        trainer.validate(c, m, a, mesh_of(fsdp=32, tensor=2))


def test_placeholder_data_paths_are_reported(tmp_path):
    from exgra_jax.config_paths import ConfigPathError, check_config_paths

    c = load("stage2_7b", str(tmp_path))
    with pytest.raises(ConfigPathError, match=r"config\.data\.json_paths\[0\] = .*does not "
                                              r"exist(.|\n)*config\.init\.hf_dir = "):
        check_config_paths(c)
