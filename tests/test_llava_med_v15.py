"""LLaVA-Med v1.5 (``llava_mistral``): a directory written with v1.5's tensor names and
config keys imports with the logits of a reference assembled from transformers'
MistralForCausalLM + CLIPVisionModel + a torch projector; its llava-hf export, loaded with
``from_pretrained`` + ``AutoProcessor`` + ``apply_chat_template``, gives our prompt ids,
pixels and greedy tokens, with the real Mistral tokenizer."""

from __future__ import annotations

import json
import os

import hf_fixtures as F
import jax
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from exgra_jax.convert import hf
from exgra_jax.convert.processor import save_processor
from exgra_jax.convert.safetensors_io import write_safetensors
from exgra_jax.data.conversation import ConversationTokenizer
from exgra_jax.data.image import ImageConfig, ImagePreprocessor
from exgra_jax.data.tokenizer import load_tokenizer
from exgra_jax.inference.generate import GenerationConfig, generate
from exgra_jax.models.llava import LlavaModel

SIZE, PATCH = 48, 8  # the 336-px tower in miniature: 6 x 6 patches, 37 position rows
N_IMG = (SIZE // PATCH) ** 2
VOCAB = 32000  # Mistral-7B's, so the real tokenizer drives the model


def _v15_config(mistral, clip) -> dict:
    """The config keys of microsoft/llava-med-v1.5-mistral-7b, with tiny sizes."""
    text = mistral.config
    return {
        "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral",
        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
        "max_position_embeddings": 256, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size":
        clip.config.hidden_size, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
        "tokenizer_model_max_length": 256, "tokenizer_padding_side": "right",
        "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "use_mm_proj": True,
    }


def _write_v15(out_dir, mistral, clip, projector):
    tensors = {}
    for k, v in mistral.state_dict().items():  # model.* and lm_head.weight
        tensors[k] = v.numpy()
    for k, v in clip.state_dict().items():  # (vision_model.)embeddings.*, encoder.*, ...
        k = k.removeprefix("vision_model.")
        tensors["model.vision_tower.vision_tower.vision_model." + k] = v.numpy()
    for k, v in projector.state_dict().items():  # 0.weight, 0.bias, 2.weight, 2.bias
        tensors["model.mm_projector." + k] = v.numpy()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    os.makedirs(out_dir, exist_ok=True)
    for fname, keys in shards.items():
        write_safetensors(os.path.join(out_dir, fname),
                          [(k, tensors[k].shape, tensors[k].dtype) for k in keys],
                          tensors.__getitem__)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(_v15_config(mistral, clip), f)


@pytest.fixture(scope="module")
def v15(tmp_path_factory):
    root = tmp_path_factory.mktemp("v15")
    mistral = F.mistral(seed=31, vocab_size=VOCAB)
    clip = F.clip_vision(seed=32, image_size=SIZE, patch_size=PATCH)
    torch.manual_seed(33)
    projector = torch.nn.Sequential(torch.nn.Linear(clip.config.hidden_size, 64),
                                    torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
    d = str(root / "llava-med-v1.5")
    _write_v15(d, mistral, clip, projector)
    # v1.5 does not record the vision head count (ViT-L/14's 16 = width / 64 is inferred).
    cfg, params = hf.load_llava_med(d, vision_heads=4)
    tok = load_tokenizer(F.mistral_tokenizer_dir(str(root / "tokenizer")))
    return dict(root=root, dir=d, mistral=mistral, clip=clip, projector=projector, cfg=cfg,
                params=params, tok=tok)


def _reference_logits(v15, text_ids, image_at, pix_nchw):
    """LLaVA v1.5's forward in torch: CLIP layer -2 patches -> projector, spliced at the
    image position (the -200 placeholder in LLaVA's code), through MistralForCausalLM."""
    with torch.no_grad():
        hidden = v15["clip"](pixel_values=torch.tensor(pix_nchw),
                             output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = v15["projector"](hidden)
        embeds = v15["mistral"].model.embed_tokens(torch.tensor(text_ids))
        rows = [torch.cat([e[:image_at], f, e[image_at:]]) for e, f in zip(embeds, feats,
                                                                           strict=True)]
        return v15["mistral"](inputs_embeds=torch.stack(rows)).logits.numpy()


def test_v15_import_logits_equal_the_reference(v15):
    cfg, params = v15["cfg"], v15["params"]
    assert (cfg.llm_type, cfg.image_size, cfg.vision_positions) == ("mistral", SIZE, N_IMG + 1)
    assert (cfg.rope_theta, cfg.rms_eps, cfg.sliding_window, cfg.num_kv_heads) == (1e6, 1e-5,
                                                                                  0, 2)
    # LLaVA-Med v1's four tokens appended: [PAD] 32000, <im_patch> 32001, ...
    assert (cfg.vocab_size, cfg.pad_token_id, cfg.image_token_id) == (VOCAB + 4, VOCAB,
                                                                       VOCAB + 1)
    assert hf.release_template(v15["dir"]) == "mistral_instruct"
    rng = np.random.default_rng(0)
    text = rng.integers(3, VOCAB, (2, 10))
    image_at = 4
    pix = rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    ref = _reference_logits(v15, text, image_at, pix)
    ids = np.concatenate([text[:, :image_at], np.full((2, N_IMG), cfg.image_token_id),
                          text[:, image_at:]], 1)
    ours = jax.jit(LlavaModel(cfg).apply)({"params": params}, ids, pix.transpose(0, 2, 3, 1))
    ours = np.asarray(ours)[..., :VOCAB]
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4


def test_v15_unknown_tensors_are_refused(v15, tmp_path):
    d = str(tmp_path / "with_extra")
    _write_v15(d, v15["mistral"], v15["clip"], v15["projector"])
    write_safetensors(os.path.join(d, "extra.safetensors"),
                      [("model.graph_head.weight", (2, 2), np.dtype(np.float32))],
                      lambda name: np.zeros((2, 2), np.float32))
    index_path = os.path.join(d, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"]["model.graph_head.weight"] = "extra.safetensors"
    json.dump(index, open(index_path, "w"))
    with pytest.raises(ValueError, match=r"model\.graph_head\.weight"):
        hf.load_llava_med(d, vision_heads=4)


def test_v15_export_loads_in_transformers_with_our_prompt_and_answers(v15):
    cfg, params, tok = v15["cfg"], v15["params"], v15["tok"]
    out = str(v15["root"] / "export")
    image_config = ImageConfig(SIZE, "pad")
    hf.save_llava(cfg, params, out)
    save_processor(out, cfg, tok, template="mistral_instruct", image_first=True,
                   use_im_start_end=False, image=image_config)
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 56, 3), np.uint8))
    question = "What abnormality is seen in the left lung?"
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True,
                                           tokenize=True, return_dict=True,
                                           return_tensors="pt")

    conv = ConversationTokenizer(tok, "mistral_instruct", cfg.num_image_tokens, False)
    ids = conv.prompt_ids(question, True, image_first=True)
    pixels = ImagePreprocessor(image_config)(image)
    assert inputs["input_ids"][0].tolist() == ids.tolist()
    np.testing.assert_allclose(inputs["pixel_values"][0].numpy().transpose(1, 2, 0), pixels,
                               atol=1e-5)

    steps = 8
    with torch.no_grad():
        theirs = model.generate(**inputs, max_new_tokens=steps, do_sample=False,
                                eos_token_id=tok.eos_token_id, pad_token_id=cfg.pad_token_id)
    theirs = theirs[0, len(ids):].tolist()
    assert len(theirs) > 1
    gen = GenerationConfig(max_new_tokens=steps, eos_token_ids=(tok.eos_token_id,),
                           pad_token_id=cfg.pad_token_id)
    ours = generate(cfg, params, ids[None], np.ones((1, len(ids)), np.int32), pixels[None],
                    config=gen)
    ours = np.asarray(ours.tokens)[0, :len(theirs)].tolist()
    assert ours == theirs


def test_v15_preset_and_configs_match_the_release():
    """The 7B preset equals what the loader reads from v1.5's published config keys, and
    the two v1.5 configs use it with v1.5's prompt settings."""
    import importlib.util

    from exgra_jax.models import config as mc

    release = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "rope_theta": 1e6, "sliding_window": None, "rms_norm_eps": 1e-5,
               "vocab_size": 32000, "max_position_embeddings": 32768}
    fields = mc.text_fields_from_hf(release)
    fields["vocab_size"] += 4  # LLaVA-Med v1's tokens, appended on import
    preset = mc.llava_med_v15_7b()
    assert {k: getattr(preset, k) for k in fields} == fields
    assert (preset.image_size, preset.patch_size, preset.num_image_tokens) == (336, 14, 576)
    assert preset.vision_positions == 577
    for name in ("stage2_from_llava_med_v15", "eval_llava_med_v15_vqa_rad"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(
            os.path.dirname(__file__), "..", "configs", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config()
        model = mc.ModelConfig.from_dict(c.model.to_dict())
        assert model.replace(dtype="float32", param_dtype="float32", remat_policy="none") == \
            preset
        assert (c.data.template, c.data.mm_use_im_start_end, c.data.image_aspect,
                c.eval.image_first, c.init.source) == ("mistral_instruct", False, "pad", True,
                                                       "llava_med")


def test_exgra_med_release_with_dense_connector(tmp_path):
    """ExGra-Med's release layout: LLaVA v1 (LlavaLlamaForCausalLM, CLIP-224 analogue, image
    start/end tokens in the vocabulary) with a DCI projector and ExGra-Med's extra config
    keys; the connector is read from ``mm_dense_connector_type``. Image features equal the
    DCI rule applied to transformers' CLIP hidden states with the torch projector."""
    llama = F.llama(seed=41, vocab_size=132)  # 128 + [PAD], <im_patch>, <im_start>, <im_end>
    clip = F.clip_vision(seed=42)
    torch.manual_seed(43)
    width = clip.config.hidden_size
    projector = torch.nn.Sequential(torch.nn.Linear(3 * width, 64), torch.nn.GELU(),
                                    torch.nn.Linear(64, 64)).eval()
    d = str(tmp_path / "exgra-med")
    _write_v15(d, llama, clip, projector)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava", vocab_size=132,
               rope_theta=10000.0, rms_norm_eps=1e-6, mm_use_im_start_end=True,
               mm_vision_tower="openai/clip-vit-large-patch14", mm_dense_connector_type="dci",
               num_l=6, contrastive=True, multi_graph=True, after_de=True, alpha=1.0)
    for key in ("mm_use_im_patch_token", "sliding_window"):
        cfg.pop(key)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))

    loaded, params = hf.load_llava_med(d, vision_heads=4, image_token_id=129,
                                       dci_ranges=((0, 2), (2, 4)))
    assert (loaded.dense_connector, loaded.llm_type, loaded.vocab_size) == ("dci", "llama", 132)
    assert hf.release_template(d) == "llava_v0"
    pix = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        hs = clip(pixel_values=torch.tensor(pix), output_hidden_states=True).hidden_states
        feats = torch.cat([hs[-2][:, 1:], torch.stack(hs[0:2]).mean(0)[:, 1:],
                           torch.stack(hs[2:4]).mean(0)[:, 1:]], -1)
        ref = projector(feats).numpy()
    ours = jax.jit(lambda p, x: LlavaModel(loaded).apply(
        {"params": p}, x, method=LlavaModel.encode_images))(params, pix.transpose(0, 2, 3, 1))
    assert np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max() <= 1e-5
