"""Tiny random Hugging Face models written to disk, the reference for parity tests."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
IMAGE_TOKEN = 100
SIGLIP = dict(VISION, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# Mistral-7B's shape in miniature: GQA, rope_theta 1e6, RMS eps 1e-5.
MISTRAL = dict(TEXT, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Replace every parameter (norms included) with noise so no mapping hides behind a
    default value such as ones or zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if ("norm" in name or "layrnorm" in name) else 0.08
            base = 1.0 if name.endswith("weight") and ("norm" in name or "layrnorm" in name) else 0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))


def _random_model(model_cls, config, seed: int):
    torch.manual_seed(seed)
    m = model_cls(config).eval()
    _randomize(m, seed)
    return m


def clip_vision(seed: int = 0, **overrides) -> CLIPVisionModel:
    return _random_model(CLIPVisionModel, CLIPVisionConfig(**{**VISION, **overrides}), seed)


def siglip_vision(seed: int = 0, **overrides) -> SiglipVisionModel:
    return _random_model(SiglipVisionModel, SiglipVisionConfig(**{**SIGLIP, **overrides}), seed)


def llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    return _random_model(LlamaForCausalLM, LlamaConfig(**{**TEXT, **overrides}), seed)


def mistral(seed: int = 0, **overrides) -> MistralForCausalLM:
    return _random_model(MistralForCausalLM, MistralConfig(**{**MISTRAL, **overrides}), seed)


def llava(seed: int = 0, vision=None, text=None, text_model: str = "llama",
          vision_model: str = "clip", **overrides) -> LlavaForConditionalGeneration:
    """A llava-hf model; ``text_model`` 'llama' | 'mistral', ``vision_model`` 'clip' | 'siglip'
    (SigLIP has no CLS token to drop: strategy 'full')."""
    text_cls, text_base = {"llama": (LlamaConfig, TEXT),
                           "mistral": (MistralConfig, MISTRAL)}[text_model]
    vision_cls, vision_base = {"clip": (CLIPVisionConfig, VISION),
                               "siglip": (SiglipVisionConfig, SIGLIP)}[vision_model]
    vision_cfg = {**vision_base, **(vision or {})}
    if vision_model == "siglip":
        vision_cfg.setdefault("vision_use_head", False)
    cfg = LlavaConfig(
        vision_config=vision_cls(**vision_cfg),
        text_config=text_cls(**{**text_base, **(text or {})}),
        image_token_index=IMAGE_TOKEN,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full" if vision_model == "siglip" else "default",
        vision_feature_layer=-2,
        **overrides,
    )
    return _random_model(LlavaForConditionalGeneration, cfg, seed)


def exported_llava(tmp_path_factory, seed: int = 3):
    """(our config, our params, the directory save_llava wrote them to) of a randomized
    tiny llava-hf model loaded by load_llava: our export, for transformers to reload."""
    from exgra_jax.convert import hf  # noqa: PLC0415

    src = str(tmp_path_factory.mktemp("src"))
    llava(seed=seed).save_pretrained(src)
    cfg, params = hf.load_llava(src)
    out = str(tmp_path_factory.mktemp("export"))
    hf.save_llava(cfg, params, out)
    return cfg, params, out


def mistral_tokenizer_dir(out_dir: str) -> str:
    """Mistral-7B's sentencepiece tokenizer, shipped by mistral-common (tokenizer.model.v1,
    the tokenizer of LLaVA-Med v1.5), as a Hugging Face tokenizer directory. ``legacy``
    tokenization: every text piece between special tokens starts a new sentencepiece word,
    as LLaVA's chunk-by-chunk tokenization does."""
    import json
    import os
    import shutil

    import mistral_common

    model = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(model, os.path.join(out_dir, "tokenizer.model"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "legacy": True, "add_bos_token": True,
                   "add_eos_token": False}, f)
    return out_dir
