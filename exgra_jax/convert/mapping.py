"""Declarative parameter mapping between exgra_jax and Hugging Face checkpoints.

Each rule pairs an exgra_jax parameter path (unscanned form, '/'-joined, ``{i}`` for the
layer) with a tensor name relative to a component prefix, and names the transform between
the two layouts. A layout is a set of prefixes: the same rules serve llava-hf, the
LLaVA-Med v1 / ExGra-Med release and separate CLIP + LLaMA directories.

exgra_jax kernels are [in, out] (attention kernels split heads: q/k/v [d, heads, head_dim],
o [heads, head_dim, d]); PyTorch Linear weights are [out, in].
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str
    hf: str
    transform: str = "copy"


# transform name -> (hf -> ours given our shape, ours -> hf, hf shape from our shape)
def _heads_in_to_hf(x):
    return x.reshape(x.shape[0], -1).T


def _heads_out_to_hf(x):
    return x.reshape(-1, x.shape[-1]).T


TRANSFORMS = {
    "copy": (lambda h, s: h.reshape(s), lambda o: o, lambda s: s),
    "linear": (lambda h, s: h.T.reshape(s), lambda o: o.T, lambda s: s[::-1]),
    "heads_in": (lambda h, s: h.T.reshape(s), _heads_in_to_hf,
                 lambda s: (int(np.prod(s[1:])), s[0])),
    "heads_out": (lambda h, s: h.T.reshape(s), _heads_out_to_hf,
                  lambda s: (s[-1], int(np.prod(s[:-1])))),
    "flat": (lambda h, s: h.reshape(s), lambda o: o.reshape(-1), lambda s: (int(np.prod(s)),)),
    # conv [out, in, kh, kw] <-> patch kernel [kh, kw, in, out]
    "patch": (lambda h, s: h.transpose(2, 3, 1, 0), lambda o: o.transpose(3, 2, 0, 1),
              lambda s: (s[3], s[2], s[0], s[1])),
}

CLIP_RULES = (
    Rule("vision_tower/patch_embed/kernel", "embeddings.patch_embedding.weight", "patch"),
    Rule("vision_tower/class_embed", "embeddings.class_embedding"),
    Rule("vision_tower/pos_embed", "embeddings.position_embedding.weight"),
    Rule("vision_tower/pre_ln/scale", "pre_layrnorm.weight"),
    Rule("vision_tower/pre_ln/bias", "pre_layrnorm.bias"),
    Rule("vision_tower/post_ln/scale", "post_layernorm.weight"),
    Rule("vision_tower/post_ln/bias", "post_layernorm.bias"),
)
SIGLIP_RULES = (
    Rule("vision_tower/patch_embed/kernel", "embeddings.patch_embedding.weight", "patch"),
    Rule("vision_tower/patch_embed/bias", "embeddings.patch_embedding.bias"),
    Rule("vision_tower/pos_embed", "embeddings.position_embedding.weight"),
    Rule("vision_tower/post_ln/scale", "post_layernorm.weight"),
    Rule("vision_tower/post_ln/bias", "post_layernorm.bias"),
)
# SigLIP and CLIP encoder layers carry the same tensor names.
CLIP_LAYER_RULES = (
    Rule("vision_tower/layers_{i}/ln1/scale", "encoder.layers.{i}.layer_norm1.weight"),
    Rule("vision_tower/layers_{i}/ln1/bias", "encoder.layers.{i}.layer_norm1.bias"),
    Rule("vision_tower/layers_{i}/ln2/scale", "encoder.layers.{i}.layer_norm2.weight"),
    Rule("vision_tower/layers_{i}/ln2/bias", "encoder.layers.{i}.layer_norm2.bias"),
    *(
        r
        for n in ("q", "k", "v")
        for r in (
            Rule(f"vision_tower/layers_{{i}}/attn/{n}/kernel",
                 f"encoder.layers.{{i}}.self_attn.{n}_proj.weight", "heads_in"),
            Rule(f"vision_tower/layers_{{i}}/attn/{n}/bias",
                 f"encoder.layers.{{i}}.self_attn.{n}_proj.bias", "flat"),
        )
    ),
    Rule("vision_tower/layers_{i}/attn/o/kernel", "encoder.layers.{i}.self_attn.out_proj.weight",
         "heads_out"),
    Rule("vision_tower/layers_{i}/attn/o/bias", "encoder.layers.{i}.self_attn.out_proj.bias"),
    Rule("vision_tower/layers_{i}/fc1/kernel", "encoder.layers.{i}.mlp.fc1.weight", "linear"),
    Rule("vision_tower/layers_{i}/fc1/bias", "encoder.layers.{i}.mlp.fc1.bias"),
    Rule("vision_tower/layers_{i}/fc2/kernel", "encoder.layers.{i}.mlp.fc2.weight", "linear"),
    Rule("vision_tower/layers_{i}/fc2/bias", "encoder.layers.{i}.mlp.fc2.bias"),
)
LLAMA_RULES = (
    Rule("llm/embed_tokens", "embed_tokens.weight"),
    Rule("llm/norm/scale", "norm.weight"),
)
LLAMA_LAYER_RULES = (
    Rule("llm/layers_{i}/input_norm/scale", "layers.{i}.input_layernorm.weight"),
    Rule("llm/layers_{i}/post_attn_norm/scale", "layers.{i}.post_attention_layernorm.weight"),
    Rule("llm/layers_{i}/attn/q/kernel", "layers.{i}.self_attn.q_proj.weight", "heads_in"),
    Rule("llm/layers_{i}/attn/k/kernel", "layers.{i}.self_attn.k_proj.weight", "heads_in"),
    Rule("llm/layers_{i}/attn/v/kernel", "layers.{i}.self_attn.v_proj.weight", "heads_in"),
    Rule("llm/layers_{i}/attn/o/kernel", "layers.{i}.self_attn.o_proj.weight", "heads_out"),
    Rule("llm/layers_{i}/mlp/gate/kernel", "layers.{i}.mlp.gate_proj.weight", "linear"),
    Rule("llm/layers_{i}/mlp/up/kernel", "layers.{i}.mlp.up_proj.weight", "linear"),
    Rule("llm/layers_{i}/mlp/down/kernel", "layers.{i}.mlp.down_proj.weight", "linear"),
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each component lives in a checkpoint's tensor names."""

    name: str
    vision: str | None  # prefix of the CLIP vision transformer, None when absent
    projector: str | None
    projector_layers: tuple[str, str] = ("linear_1", "linear_2")
    llm: str | None = None
    lm_head: str | None = None


LAYOUTS = {
    # What the Hub's llava-hf checkpoints hold and what save_llava writes.
    "llava_hf": Layout("llava_hf", "vision_tower.vision_model.", "multi_modal_projector.",
                       llm="language_model.model.", lm_head="language_model.lm_head.weight"),
    # transformers >= 5 module names, and what its save_pretrained writes.
    "llava_hf_v5": Layout("llava_hf_v5", "model.vision_tower.", "model.multi_modal_projector.",
                          llm="model.language_model.", lm_head="lm_head.weight"),
    "llava_hf_v5_saved": Layout("llava_hf_v5_saved", "vision_tower.", "multi_modal_projector.",
                                llm="language_model.model.",
                                lm_head="language_model.lm_head.weight"),
    # LLaVA-Med v1 / ExGra-Med release (LlavaLlamaForCausalLM).
    "llava_med_v1": Layout("llava_med_v1", "model.vision_tower.vision_tower.vision_model.",
                           "model.mm_projector.", ("0", "2"), llm="model.",
                           lm_head="lm_head.weight"),
    # The Hub's CLIPVisionModel / CLIPModel / SiglipVisionModel, and what transformers >= 5
    # save_pretrained writes for them.
    "clip": Layout("clip", "vision_model.", None),
    "clip_v5": Layout("clip_v5", "", None),
    "llama": Layout("llama", None, None, llm="model.", lm_head="lm_head.weight"),
}

# Tensors a checkpoint may hold that no model here reads: RoPE tables and position ids
# that transformers recomputes (suffixes), and SigLIP's pooling head (under the vision
# prefix), which LLaVA never runs.
UNUSED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
UNUSED_VISION_PARTS = ("head.",)


def projector_rules(config, layout: Layout) -> tuple[Rule, ...]:
    if config.projector == "identity":
        return ()
    first, second = layout.projector_layers
    names = [("linear_1", first)] + ([("linear_2", second)] if config.projector == "mlp2x_gelu"
                                     else [])
    rules = []
    for ours, theirs in names:
        rules.append(Rule(f"projector/{ours}/kernel", f"{theirs}.weight", "linear"))
        if config.projector_bias:
            rules.append(Rule(f"projector/{ours}/bias", f"{theirs}.bias"))
    return tuple(rules)


def expand(config, layout: Layout, components=("vision", "projector", "llm")):
    """Yield (our unscanned path, full HF tensor name, transform) for a config and layout."""
    if "vision" in components and layout.vision is not None:
        for r in CLIP_RULES if config.vision_has_cls else SIGLIP_RULES:
            yield r.ours, layout.vision + r.hf, r.transform
        for i in range(config.vision_layers):
            for r in CLIP_LAYER_RULES:
                yield r.ours.format(i=i), layout.vision + r.hf.format(i=i), r.transform
    if "projector" in components and layout.projector is not None:
        for r in projector_rules(config, layout):
            yield r.ours, layout.projector + r.hf, r.transform
    if "llm" in components and layout.llm is not None:
        for r in LLAMA_RULES:
            yield r.ours, layout.llm + r.hf, r.transform
        for i in range(config.num_layers):
            for r in LLAMA_LAYER_RULES:
                yield r.ours.format(i=i), layout.llm + r.hf.format(i=i), r.transform
        if not config.tie_embeddings:
            yield "llm/lm_head/kernel", layout.lm_head, "linear"


def locate(path: str, scanned: bool) -> tuple[str, int | None]:
    """Map an unscanned path to (path in the actual tree, layer index if stacked)."""
    if scanned and path.startswith("llm/layers_"):
        head, rest = path[len("llm/layers_"):].split("/", 1)
        return f"llm/layers/{rest}", int(head)
    return path, None
