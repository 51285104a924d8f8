"""Every shipped config runs in miniature (``configs/NAME.py:...,mini``) with the same code
path as at 7B: its init source read from a checkpoint in the format it expects, the real
LLaVA-Med v1 vocabulary (Mistral-7B's sentencepiece model, as shipped by mistral-common,
plus the four added tokens at 32000-32003), bf16 compute with fp32 master weights, its
regexes, mesh axes, alignment settings and best-step selection, on 8 CPU devices.

The chain is the one users run: stage 1 from CLIP + LLaMA directories -> to-hf -> stage 2
from that llava-hf export -> to-hf -> VQA-RAD fine-tuning (TFDS data, validation answers,
best step) -> to-hf --step best -> zero-shot and VQA evaluation of the export.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from exgra_jax.checkpoint import Checkpointer
from exgra_jax.train.miniature import MINI_STEPS, MINI_TEXT, MINI_VISION

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = ""


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    global CACHE_DIR
    CACHE_DIR = str(tmp_path_factory.mktemp("jax_cache"))


def run(*args, check=True, timeout=900):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def train(config_spec: str, workdir: str, *overrides: str):
    return run("launch/train.py", f"--config={config_spec}", f"--workdir={workdir}", *overrides)


def to_hf(workdir: str, out: str, *extra: str):
    run("tools/convert_checkpoint.py", "to-hf", "--workdir", workdir, "--out", out, *extra)
    return out


def saved_state(workdir: str, directory: str = "checkpoints"):
    import orbax.checkpoint as ocp

    ckpt = Checkpointer(os.path.join(workdir, directory), async_save=False)
    step = ckpt.latest_step()
    state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    ckpt.close()
    return step, state["state"]


def assert_fp32_master_state(state):
    """Parameters and Adam moments are float32 whatever the source's dtype."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"]):
        assert leaf.dtype == np.float32, jax.tree_util.keystr(path)
    moments = [x for p, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])
               if np.ndim(x) > 0]
    assert moments and all(x.dtype == np.float32 for x in moments)


# ------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The file layout the configs expect under their data root, from the demo generator,
    with the real LLaMA-family tokenizer."""
    root = str(tmp_path_factory.mktemp("llava_med"))
    demo = os.path.join(root, "demo")
    run("tools/make_demo_data.py", "--out", demo, "--num-images", "24", "--image-size", "32",
        "--no-tokenizer")
    shutil.copytree(os.path.join(demo, "images"), os.path.join(root, "images"))
    shutil.copy(os.path.join(demo, "pretrain.json"),
                os.path.join(root, "llava_med_alignment_500k.json"))
    shutil.copy(os.path.join(demo, "instruct.json"),
                os.path.join(root, "llava_med_instruct_60k_inline_mention_long.json"))
    from hf_fixtures import mistral_tokenizer_dir

    mistral_tokenizer_dir(os.path.join(root, "tokenizer"))
    return root


@pytest.fixture(scope="module")
def clip_llama_dirs(tmp_path_factory):
    """stage1_7b's init format: a CLIPVisionModel and a LlamaForCausalLM directory at the
    miniature's sizes (LLaMA's own 32000-token vocabulary)."""
    from hf_fixtures import clip_vision, llama

    root = tmp_path_factory.mktemp("init")
    v = MINI_VISION
    clip = clip_vision(hidden_size=v["vision_width"], intermediate_size=v["vision_mlp"],
                       num_hidden_layers=v["vision_layers"],
                       num_attention_heads=v["vision_heads"], image_size=v["image_size"],
                       patch_size=v["patch_size"])
    t = MINI_TEXT
    lm = llama(vocab_size=32000, hidden_size=t["hidden_size"], intermediate_size=t["mlp_size"],
               num_hidden_layers=t["num_layers"], num_attention_heads=t["num_heads"],
               num_key_value_heads=t["num_heads"], max_position_embeddings=t["max_positions"])
    clip.save_pretrained(str(root / "clip"))
    lm.save_pretrained(str(root / "llama"))
    return str(root / "clip"), str(root / "llama")


# ------------------------------------------------------------------------------ the chain
@pytest.fixture(scope="module")
def stage1(data_root, clip_llama_dirs, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("stage1"))
    clip, lm = clip_llama_dirs
    spec = f"configs/stage1_7b.py:{data_root},mini"
    init = (f"--config.init.clip_dir={clip}", f"--config.init.llama_dir={lm}")
    first = train(spec, workdir, *init, "--config.train.stop_after_steps=2")
    assert "starting from init.source=clip_llama" in first.stdout
    second = train(spec, workdir, *init)  # resumes
    assert "resumed from step 2" in second.stdout and f"[{MINI_STEPS}/{MINI_STEPS}]" in second.stdout
    return workdir, to_hf(workdir, os.path.join(workdir, "hf"))


def test_stage1_trains_only_its_rows_and_projector(stage1, clip_llama_dirs):
    workdir, _ = stage1
    step, state = saved_state(workdir)
    assert step == MINI_STEPS
    assert_fp32_master_state(state)
    from safetensors.numpy import load_file

    llama_dir = clip_llama_dirs[1]
    original = load_file(os.path.join(llama_dir, "model.safetensors"))["model.embed_tokens.weight"]
    embed = np.asarray(state["params"]["model"]["llm"]["embed_tokens"])
    # Rows 0..31999 are LLaMA's and stay frozen; only <im_start>/<im_end> (32002/3) train.
    np.testing.assert_array_equal(embed[:32000], original.astype(np.float32))
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert os.path.isabs(config["data"]["json_paths"][0]) and os.path.isabs(config["tokenizer"])


@pytest.fixture(scope="module")
def stage2(data_root, stage1, tmp_path_factory):
    _, stage1_hf = stage1
    spec = f"configs/stage2_7b.py:{data_root},mini"
    init = (f"--config.init.hf_dir={stage1_hf}",)
    ref = str(tmp_path_factory.mktemp("stage2_ref"))
    train(spec, ref, *init)
    workdir = str(tmp_path_factory.mktemp("stage2"))
    train(spec, workdir, *init, "--config.train.stop_after_steps=2")
    train(spec, workdir, *init)
    return ref, workdir, to_hf(workdir, os.path.join(workdir, "hf"))


def test_stage2_from_llava_hf_keeps_fp32_master_weights_and_resumes_exactly(stage2):
    ref, workdir, _ = stage2
    step_a, a = saved_state(ref)
    step_b, b = saved_state(workdir)
    assert step_a == step_b == MINI_STEPS
    assert_fp32_master_state(b)
    assert "alignment" in b["params"]
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def vqa_rad(tmp_path_factory):
    """VQA-RAD in its release format, built with the TFDS builder and exported as
    LLaVA-Med VQA JSON, as the fine-tuning config's docstring says."""
    from test_data_tfds import make_vqa_rad

    root = tmp_path_factory.mktemp("vqa_rad")
    images = make_vqa_rad(str(root / "raw"))
    run("-m", "exgra_jax.data.tfds.prepare", "vqa_rad", "--manual-dir", str(root / "raw"),
        "--data-dir", str(root / "tfds"), "--export-dir", str(root / "json"))
    return str(root / "tfds"), str(root / "json"), images


@pytest.fixture(scope="module")
def finetune(vqa_rad, stage2, tmp_path_factory):
    tfds_dir, vqa_json, images = vqa_rad
    workdir = str(tmp_path_factory.mktemp("finetune"))
    # VQA-RAD's export names images in the release's own folder (prepare.py says so).
    out = train(f"configs/finetune_vqa_rad_7b.py:{tfds_dir},{vqa_json},mini", workdir,
                f"--config.init.hf_dir={stage2[2]}", f"--config.eval.image_folder={images}")
    assert "[val_vqa @ 2]" in out.stdout and "[val_vqa @ 4]" in out.stdout
    return workdir, to_hf(workdir, os.path.join(workdir, "hf"), "--step", "best")


def test_finetune_selects_evaluates_and_exports_the_best_step(finetune):
    workdir, hf = finetune
    best = json.load(open(os.path.join(workdir, "best", "best.json")))
    assert best["step"] in (2, 4) and best["select_metric"] == "mean(open_recall,closed_accuracy)"
    for step in (2, 4):
        scores = json.load(open(os.path.join(workdir, "val_vqa", f"step_{step}.metrics.json")))
        assert best["value"] >= np.mean([scores["open_recall"], scores["closed_accuracy"]])
    out = run("launch/eval.py", f"--workdir={workdir}", "--task=vqa", "--step=best")
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert printed["num_questions"] == 2 and printed["num_skipped"] == 0
    # The export holds the best step and loads in transformers.
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(hf)
    assert model.config.text_config.vocab_size == 32004


def test_zero_shot_evaluates_an_export(finetune, data_root, tmp_path):
    _, hf = finetune
    images = sorted(os.listdir(os.path.join(data_root, "images")))[:3]
    questions = [{"question_id": i, "question": "What modality is shown?", "option_A": "CT",
                  "option_B": "MRI", "gt_answer": "CT", "image_path": f"images/{name}",
                  "dataset": "Mini", "question_type": "Modality Recognition"}
                 for i, name in enumerate(images)]
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps(questions))
    out = run("launch/eval.py", f"--config=configs/zero_shot.py:{data_root},mini",
              f"--workdir={tmp_path}", "--task=zero_shot", f"--hf_dir={hf}",
              f"--config.eval.json_paths={qa}")
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert printed["overall"]["total"] == 3


def make_slake_release(root: str) -> None:
    """SLAKE's release layout (imgs/xmlabN/source.jpg, train/validate/test JSON), English and
    Chinese questions, an open and a closed one in every split."""
    from test_data_tfds import _pixels, _save, _slake

    for i in range(2):
        _save(os.path.join(root, "imgs", f"xmlab{i}", "source.jpg"), _pixels(i, 20, 16), "JPEG")
    splits = {"train.json": 10, "validate.json": 20, "test.json": 30}
    for name, base in splits.items():
        records = [
            _slake(base, "xmlab0/source.jpg", "Does the picture contain liver?", "Yes", "CLOSED"),
            _slake(base + 1, "xmlab1/source.jpg", "What modality is used?", "CT", "OPEN"),
            _slake(base + 2, "xmlab1/source.jpg", "这是什么模态?", "CT", "OPEN", lang="zh"),
        ]
        with open(os.path.join(root, name), "w", encoding="utf-8") as f:
            json.dump(records, f, ensure_ascii=False)


def make_path_vqa_release(root: str) -> None:
    """PathVQA's parquet release, a yes/no and an open question in every split."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_data_tfds import _encoded, _pixels

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    os.makedirs(os.path.join(root, "data"))
    for i, split in enumerate(("train", "validation", "test")):
        image = {"bytes": _encoded(_pixels(10 + i)), "path": f"{split}_0001.jpg"}
        table = pa.table({"image": pa.array([image, image], type=image_type),
                          "question": ["Is this a granuloma?", "What stain is used?"],
                          "answer": ["yes", "h&e"]})
        pq.write_table(table, os.path.join(root, "data", f"{split}-00000-of-00001.parquet"))


@pytest.mark.parametrize("name,builder,make,images", [
    ("finetune_slake_7b", "slake", make_slake_release, "raw/imgs"),
    ("finetune_pathvqa_7b", "path_vqa", make_path_vqa_release, "json/images"),
])
def test_the_other_finetune_recipes_train_select_and_export(name, builder, make, images,
                                                            stage2, tmp_path):
    make(str(tmp_path / "raw"))
    tfds_dir, vqa_json = str(tmp_path / "tfds"), str(tmp_path / "json")
    run("-m", "exgra_jax.data.tfds.prepare", builder, "--manual-dir", str(tmp_path / "raw"),
        "--data-dir", tfds_dir, "--export-dir", vqa_json)
    workdir = str(tmp_path / "run")
    out = train(f"configs/{name}.py:{tfds_dir},{vqa_json},mini", workdir,
                f"--config.init.hf_dir={stage2[2]}",
                f"--config.eval.image_folder={tmp_path / images}")
    assert "[val_vqa @ 4]" in out.stdout
    best = json.load(open(os.path.join(workdir, "best", "best.json")))
    assert best["step"] in (2, 4)
    to_hf(workdir, str(tmp_path / "hf"), "--step", "best")
    assert os.path.isfile(str(tmp_path / "hf" / "config.json"))


@pytest.fixture(scope="module")
def v15_release(data_root, tmp_path_factory):
    """A LLaVA-Med v1.5 release directory (llava_mistral: Mistral + CLIP-336 layout, v1.5's
    tensor names and config keys, sharded safetensors, its tokenizer) at miniature sizes."""
    import torch
    from hf_fixtures import clip_vision, mistral
    from test_llava_med_v15 import _write_v15

    from exgra_jax.models.config import llava_med_v15_7b
    from exgra_jax.train.miniature import mini_model_sizes

    full = llava_med_v15_7b()
    m = mini_model_sizes(full.num_heads, full.num_kv_heads)
    lm = mistral(vocab_size=32000, hidden_size=m["hidden_size"], intermediate_size=m["mlp_size"],
                 num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
                 num_key_value_heads=m["num_kv_heads"], max_position_embeddings=256,
                 rope_theta=full.rope_theta, sliding_window=None)
    clip = clip_vision(hidden_size=m["vision_width"], intermediate_size=m["vision_mlp"],
                       num_hidden_layers=m["vision_layers"], num_attention_heads=m["vision_heads"],
                       image_size=m["image_size"], patch_size=m["patch_size"])
    torch.manual_seed(0)
    projector = torch.nn.Sequential(torch.nn.Linear(m["vision_width"], m["hidden_size"]),
                                    torch.nn.GELU(),
                                    torch.nn.Linear(m["hidden_size"], m["hidden_size"]))
    out = str(tmp_path_factory.mktemp("v15") / "llava-med-v1.5-mistral-7b")
    _write_v15(out, lm, clip, projector)
    for name in os.listdir(os.path.join(data_root, "tokenizer")):  # released with its tokenizer
        shutil.copy(os.path.join(data_root, "tokenizer", name), out)
    return out


def test_stage2_from_llava_med_v15_trains_from_the_release(data_root, v15_release, tmp_path):
    out = train(f"configs/stage2_from_llava_med_v15.py:{data_root},mini", str(tmp_path),
                f"--config.init.hf_dir={v15_release}", f"--config.tokenizer={v15_release}")
    assert "starting from init.source=llava_med" in out.stdout
    step, state = saved_state(str(tmp_path))
    assert step == MINI_STEPS
    assert_fp32_master_state(state)
    # v1.5's 32000 rows, then the four LLaVA-Med tokens appended.
    assert state["params"]["model"]["llm"]["embed_tokens"].shape[0] == 32004


def test_llava_med_v15_evaluates_on_vqa_rad_as_documented(vqa_rad, v15_release, tmp_path):
    _, vqa_json, images = vqa_rad
    arg = f"{vqa_json},{v15_release},mini"
    workdir = str(tmp_path / "run")
    run("tools/convert_checkpoint.py", "from-hf", "--format", "llava-med", "--hf-dir",
        v15_release, "--out", workdir, "--config", "configs/eval_llava_med_v15_vqa_rad.py",
        "--config-arg", arg)
    out = run("launch/eval.py", f"--config=configs/eval_llava_med_v15_vqa_rad.py:{arg}",
              f"--workdir={workdir}", "--task=vqa", f"--config.eval.image_folder={images}")
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert printed["num_questions"] == 2 and printed["num_skipped"] == 0


def test_lora_finetune_trains_adapters_selects_and_exports_the_merged_best(vqa_rad, stage2,
                                                                           tmp_path):
    tfds_dir, vqa_json, images = vqa_rad
    workdir = str(tmp_path / "run")
    out = train(f"configs/finetune_vqa_rad_lora_7b.py:{tfds_dir},{vqa_json},mini", workdir,
                f"--config.init.hf_dir={stage2[2]}", f"--config.eval.image_folder={images}")
    assert "[val_vqa @ 4]" in out.stdout
    _, state = saved_state(workdir)
    assert set(state["params"]) == {"lora"}  # adapters only; the base is init.hf_dir's
    printed = json.loads(run("launch/eval.py", f"--workdir={workdir}", "--task=vqa",
                             "--step=best").stdout.strip().splitlines()[-1])
    assert printed["num_questions"] == 2
    to_hf(workdir, str(tmp_path / "hf"), "--step", "best")  # the merged best step


def test_stage2_lora_trains_adapters_and_the_gnn(data_root, stage1, tmp_path):
    train(f"configs/stage2_lora_7b.py:{data_root},mini", str(tmp_path),
          f"--config.init.hf_dir={stage1[1]}")
    _, state = saved_state(str(tmp_path))
    assert set(state["params"]) == {"lora", "alignment"}
    assert_fp32_master_state(state)


# ------------------------------------------------------------------------------ recipes
# Every config file (one with get_config; a shared recipe has none) but the demo (which is
# run whole by make demo).
SHIPPED = tuple(sorted(
    f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
    if f.endswith(".py") and f != "demo.py"
    and "\ndef get_config(" in open(os.path.join(REPO, "configs", f)).read()))
# The only fields a miniature may change: sizes, lengths, batch, steps.
SIZE_FIELDS = {
    *(f"model.{k}" for k in (*MINI_VISION, *MINI_TEXT, "num_kv_heads", "dci_ranges",
                             "sci_layers", "sti_layers", "sti_pool")),
    "data.max_len", "data.response_len", "data.caption_len", "train.global_batch_size",
    "train.micro_batches", "train.total_steps", "train.checkpoint_every", "train.log_every",
    "train.eval_every", "train.eval_batches", "train.warmup_frac", "eval.batch_size",
    "eval.max_new_tokens", "alignment.graph_size", "data.images_per_row",
    "data.examples_per_row", "mesh.tensor",
}


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_miniature_changes_only_sizes(name):
    from exgra_jax.config_paths import load_config_file

    arg = "T,J" if name.startswith(("finetune", "eval_")) else "R"
    full = _flat(load_config_file(f"{REPO}/configs/{name}.py:{arg}").to_dict())
    mini = _flat(load_config_file(f"{REPO}/configs/{name}.py:{arg},mini").to_dict())
    assert set(full) == set(mini)
    changed = {k for k in full if full[k] != mini[k]}
    assert changed <= SIZE_FIELDS, sorted(changed - SIZE_FIELDS)
    # The precision policy and the vocabulary are the recipe's, not the miniature's.
    for k in ("model.dtype", "model.param_dtype", "model.vocab_size", "model.image_token_id",
              "model.remat_policy", "model.scan_layers", "init.source", "train.trainable"):
        assert mini[k] == full[k]
