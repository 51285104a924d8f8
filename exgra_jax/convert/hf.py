"""Hugging Face <-> exgra_jax checkpoints.

- ``load_llava(hf_dir)``: a llava-hf directory (config.json + safetensors) -> (ModelConfig, params)
- ``save_llava(config, params, out_dir)``: a directory that
  ``transformers.LlavaForConditionalGeneration.from_pretrained`` loads
- ``load_llava_med(hf_dir)``: the LLaVA-Med v1 / ExGra-Med release layout (LlavaLlamaForCausalLM)
  and LLaVA-Med v1.5 (``llava_mistral``, LlavaMistralForCausalLM)
- ``load_clip_llama(clip_dir, llama_dir)``: separate CLIPVisionModel or SiglipVisionModel +
  LlamaForCausalLM or MistralForCausalLM directories (the start of stage 1); the projector
  is freshly initialised.

Unknown tensors in a llava-hf or LLaVA-Med directory are refused by name, never dropped.

Conversion reads tensor by tensor from the files into preallocated arrays, so host
memory stays near one copy of the model in the target dtype.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np

from exgra_jax.convert.mapping import (
    LAYOUTS,
    TRANSFORMS,
    UNUSED_TENSOR_SUFFIXES,
    UNUSED_VISION_PARTS,
    Layout,
    expand,
    locate,
)
from exgra_jax.convert.safetensors_io import CheckpointReader, write_safetensors
from exgra_jax.models import config as mc

NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


# ----------------------------------------------------------------------------- trees
def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def abstract_params(config: mc.ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Parameter shapes by '/'-joined path, without allocating anything."""
    from exgra_jax.models import llava  # noqa: PLC0415

    return flatten(llava.abstract_params(config))


# ----------------------------------------------------------------------------- loading
def detect_layout(reader: CheckpointReader, candidates: tuple[str, ...]) -> Layout:
    keys = set(reader.keys())
    for name in candidates:
        lay = LAYOUTS[name]
        probes = []
        if lay.llm is not None:
            probes.append(lay.llm + "embed_tokens.weight")
        if lay.vision is not None:
            probes.append(lay.vision + "embeddings.patch_embedding.weight")
        if probes and all(p in keys for p in probes):
            return lay
    sample = sorted(keys)[:5]
    raise ValueError(
        f"{reader.directory}: tensor names match none of the layouts {candidates} "
        f"(first names: {sample})"
    )


def fill_params(
    config: mc.ModelConfig,
    sources: list[tuple[CheckpointReader, Layout, tuple[str, ...]]],
    dtype: str,
    init_missing: dict[str, np.ndarray] | None = None,
    grow_vocab: bool = False,
) -> dict:
    """Read every parameter named by the layouts' rules into a new tree of numpy arrays.

    With ``grow_vocab``, embedding and LM-head matrices smaller than the config's vocabulary
    fill their first rows and initialise the new ones (added special tokens) to the mean of
    the existing rows, as LLaVA does when it adds tokens.
    """
    target = abstract_params(config)
    np_dtype = NP_DTYPES[dtype]
    arrays = {p: np.empty(s.shape, np_dtype) for p, s in target.items()}
    filled: set[str] = set()
    for reader, layout, components in sources:
        for ours, theirs, tname in expand(config, layout, components):
            path, layer = locate(ours, config.scan_layers)
            if path not in arrays:
                raise KeyError(f"mapping names {path!r}, which the model does not have")
            if theirs not in reader:
                raise KeyError(f"{reader.directory}: missing tensor {theirs!r} (for {ours})")
            dest = arrays[path] if layer is None else arrays[path][layer]
            if ours in VOCAB_PARAMS:  # rows past vocab_size (vocab_pad_multiple) stay zero
                dest[...] = 0
                dest = real_vocab(dest, ours, config.vocab_size)
            tensor = reader.get(theirs)
            if grow_vocab and ours in VOCAB_PARAMS and tensor.shape[0] < config.vocab_size:
                dest[...] = _grown_vocab(tensor, config.vocab_size, ours).astype(np_dtype)
                filled.add(path)
                continue
            expected = TRANSFORMS[tname][2](dest.shape)
            if tuple(tensor.shape) != tuple(expected):
                raise ValueError(
                    f"{theirs}: shape {tuple(tensor.shape)} does not match the config "
                    f"(expected {tuple(expected)} for {ours})"
                )
            dest[...] = TRANSFORMS[tname][0](tensor, dest.shape).astype(np_dtype)
            filled.add(path)
    for path, value in (init_missing or {}).items():
        if path in arrays and path not in filled:
            arrays[path][...] = np.asarray(value).astype(np_dtype)
            filled.add(path)
    missing = sorted(set(arrays) - filled)
    if missing:
        raise ValueError(f"no checkpoint tensor for parameters: {missing[:10]}")
    return unflatten(arrays)


VOCAB_PARAMS = ("llm/embed_tokens", "llm/lm_head/kernel")


def real_vocab(x, ours: str, vocab: int):
    """The rows of a vocabulary parameter that hold real tokens (a view): the embedding is
    [padded_vocab, d], the LM head kernel [d, padded_vocab]."""
    return x[:vocab] if ours == "llm/embed_tokens" else x[:, :vocab]


def refuse_unknown_tensors(config: mc.ModelConfig, reader: CheckpointReader,
                           layouts: list[Layout]) -> None:
    """Every tensor of ``reader`` must be read by a rule or be known to be unused; anything
    else (a module this code does not implement) is refused by name rather than dropped."""
    used = {theirs for lay in layouts for _, theirs, _ in expand(config, lay)}
    vision = [lay.vision + part for lay in layouts if lay.vision is not None
              for part in UNUSED_VISION_PARTS]
    unknown = sorted(
        name for name in reader.keys()
        if name not in used and not name.endswith(UNUSED_TENSOR_SUFFIXES)
        and not name.startswith(tuple(vision)))
    if unknown:
        raise ValueError(
            f"{reader.directory}: {len(unknown)} tensors belong to nothing this model has, "
            f"e.g. {unknown[:8]}; they would be silently dropped. Check the config "
            "(dense_connector, projector, vision tower) or convert those weights first")


def _grown_vocab(tensor: np.ndarray, vocab: int, ours: str) -> np.ndarray:
    rows = np.asarray(tensor, np.float32)  # [old_vocab, d] in both HF layouts
    grown = np.concatenate([rows, np.repeat(rows.mean(0, keepdims=True), vocab - len(rows), 0)])
    return grown if ours == "llm/embed_tokens" else grown.T


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    with open(path) as f:
        return json.load(f)


def load_llava(hf_dir: str, array_dtype: str = "float32",
               **overrides) -> tuple[mc.ModelConfig, dict]:
    """Read a llava-hf directory (config.json + safetensors) -> (ModelConfig, params).
    ``array_dtype`` is the dtype the arrays are read in (the master-weight dtype);
    ``overrides`` set ModelConfig fields, e.g. the compute ``dtype``."""
    cfg_dict = _read_json(os.path.join(hf_dir, "config.json"))
    if "text_config" not in cfg_dict:
        raise ValueError(
            f"{hf_dir}: config.json has no text_config; for the LLaVA-Med v1 / ExGra-Med "
            "release layout use load_llava_med"
        )
    config = mc.from_hf(cfg_dict, **overrides)
    reader = CheckpointReader(hf_dir)
    layout = detect_layout(reader, ("llava_hf", "llava_hf_v5_saved", "llava_hf_v5"))
    refuse_unknown_tensors(config, reader, [layout])
    return config, fill_params(config, [(reader, layout, ("vision", "projector", "llm"))],
                               array_dtype)


# LLaVA-Med v1 names the vision tower but does not embed its config; these are the facts
# of openai/clip-vit-large-patch14 (and its 336 px variant).
CLIP_VIT_L14 = dict(patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                    vision_mlp=4096, vision_eps=1e-5, vision_act="quick_gelu")


def _vision_fields_from_tensors(reader: CheckpointReader, prefix: str) -> dict[str, Any]:
    patch = reader.shape(prefix + "embeddings.patch_embedding.weight")  # [d, 3, p, p]
    pos = reader.shape(prefix + "embeddings.position_embedding.weight")  # [1+g*g, d]
    layers = 0
    while f"{prefix}encoder.layers.{layers}.layer_norm1.weight" in reader:
        layers += 1
    width, p = patch[0], patch[2]
    grid = int(round((pos[0] - 1) ** 0.5))
    mlp = reader.shape(prefix + "encoder.layers.0.mlp.fc1.weight")[0]
    # Head count is not visible in the tensors: CLIP ViTs use 64-wide heads.
    heads = max(1, width // 64)
    return dict(image_size=grid * p, patch_size=p, vision_width=width, vision_layers=layers,
                vision_heads=heads, vision_mlp=mlp)


# model_type of the LLaVA-Med releases -> the text model inside.
RELEASE_TEXT_MODELS = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}
# Conversation template each release was trained with.
RELEASE_TEMPLATES = {"llama": "llava_v0", "mistral": "mistral_instruct"}


def release_template(hf_dir: str) -> str:
    """The conversation template of a LLaVA-Med release directory (v1.5: mistral_instruct)."""
    cfg = _read_json(os.path.join(hf_dir, "config.json"))
    return RELEASE_TEMPLATES[_release_text_model(cfg, hf_dir)]


def _release_text_model(cfg: dict, hf_dir: str) -> str:
    kind = cfg.get("model_type", "llava")
    if kind not in RELEASE_TEXT_MODELS:
        raise ValueError(f"{hf_dir}: model_type {kind!r} is not a LLaVA-Med release; known: "
                         f"{sorted(RELEASE_TEXT_MODELS)} (llava-hf directories: load_llava)")
    return RELEASE_TEXT_MODELS[kind]


def load_llava_med(hf_dir: str, array_dtype: str = "float32", clip_dir: str | None = None,
                   **overrides) -> tuple[mc.ModelConfig, dict]:
    """A LLaVA-Med release directory -> (ModelConfig, params).

    v1 / ExGra-Med (``LlavaLlamaForCausalLM``) and v1.5 (``llava_mistral``: Mistral text
    model, CLIP-336). The vision tower comes from the checkpoint when it holds one
    (``model.vision_tower.vision_tower.vision_model.*``), else from ``clip_dir``; its image
    size from the position embedding. A projector wider than the CLIP width means a dense
    connector: ExGra-Med records it as ``mm_dense_connector_type``, else pass
    ``dense_connector='dci'|'sci'``. A release without image tokens in its vocabulary
    (``mm_use_im_patch_token`` false, as v1.5) gets LLaVA-Med v1's four tokens appended
    ([PAD], <im_patch>, <im_start>, <im_end>; new rows = the mean row). Tensors the model
    does not have are refused by name.
    """
    cfg = _read_json(os.path.join(hf_dir, "config.json"))
    reader = CheckpointReader(hf_dir)
    layout = LAYOUTS["llava_med_v1"]
    text_model = _release_text_model(cfg, hf_dir)
    fields: dict[str, Any] = mc.text_fields_from_hf(dict(cfg, model_type=text_model))
    sources: list = [(reader, layout, ("projector", "llm"))]
    if (layout.vision + "embeddings.patch_embedding.weight") in reader:
        fields.update(_vision_fields_from_tensors(reader, layout.vision))
        sources.append((reader, layout, ("vision",)))
    elif clip_dir is not None:
        clip_cfg = _read_json(os.path.join(clip_dir, "config.json"))
        clip_cfg = clip_cfg.get("vision_config", clip_cfg)
        fields.update(mc.vision_fields_from_hf(clip_cfg))
        sources.append(_clip_source(clip_dir))
    else:
        raise ValueError(
            f"{hf_dir} holds no vision tower weights; pass clip_dir= a CLIPVisionModel directory "
            f"(the release names {cfg.get('mm_vision_tower')!r})"
        )
    proj_type = cfg.get("mm_projector_type", "linear")
    if proj_type not in ("linear", "mlp2x_gelu"):
        raise ValueError(f"unsupported mm_projector_type {proj_type!r}")
    in_dim = reader.shape("model.mm_projector.0.weight")[1]
    grow = cfg.get("mm_use_im_patch_token", True) is False
    base_vocab = fields["vocab_size"]
    fields.update(
        projector=proj_type,
        vision_select_layer=cfg.get("mm_vision_select_layer", -2),
        vision_select_strategy="patch"
        if cfg.get("mm_vision_select_feature", "patch") == "patch" else "cls_patch",
        dense_connector=str(cfg.get("mm_dense_connector_type") or "none").lower(),
        pad_token_id=base_vocab if grow else cfg.get("pad_token_id") or 0,
        image_token_id=base_vocab + 1 if grow else cfg.get("im_patch_token", 32001),
    )
    if grow:
        fields["vocab_size"] = base_vocab + 4
    fields.update(overrides)
    config = mc.ModelConfig(**fields)
    if config.connector_in_dim != in_dim:
        raise ValueError(
            f"the projector takes {in_dim} channels but the config gives {config.connector_in_dim}"
            f" (dense_connector={config.dense_connector!r}); a {in_dim // config.vision_width}x "
            "CLIP-width projector needs dense_connector='dci' or 'sci'"
        )
    refuse_unknown_tensors(config, reader, [layout])
    return config, fill_params(config, sources, array_dtype, grow_vocab=grow)


def _clip_source(clip_dir: str):
    reader = CheckpointReader(clip_dir)
    return reader, detect_layout(reader, ("clip", "clip_v5")), ("vision",)


def load_clip_llama(clip_dir: str, llama_dir: str, array_dtype: str = "float32",
                    projector_seed: int = 0, **overrides) -> tuple[mc.ModelConfig, dict]:
    """Separate vision (CLIP / SigLIP) + text (LLaMA / Mistral) directories; a fresh random
    projector."""
    clip_cfg = _read_json(os.path.join(clip_dir, "config.json"))
    clip_cfg = clip_cfg.get("vision_config", clip_cfg)
    llama_cfg = _read_json(os.path.join(llama_dir, "config.json"))
    fields = {**mc.vision_fields_from_hf(clip_cfg), **mc.text_fields_from_hf(llama_cfg)}
    base_vocab = fields["vocab_size"]
    # LLaVA-Med v1 appends [PAD], <im_patch>, <im_start>, <im_end> to the LLaMA vocabulary.
    fields.update(vocab_size=base_vocab + 4, pad_token_id=base_vocab,
                  image_token_id=base_vocab + 1)
    fields.update(overrides)
    config = mc.ModelConfig(**fields)
    import flax.linen as nn  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from exgra_jax.models.connector import Projector  # noqa: PLC0415

    # Only the projector is new; initialise it alone (never the whole 7B tree).
    dummy = jnp.zeros((1, 1, config.connector_in_dim), jnp.float32)
    proj = nn.unbox(Projector(config).init(jax.random.key(projector_seed), dummy)["params"])
    projector = {f"projector/{k}": v for k, v in flatten(proj).items()}
    sources = [_clip_source(clip_dir), (CheckpointReader(llama_dir), LAYOUTS["llama"], ("llm",))]
    return config, fill_params(config, sources, array_dtype, init_missing=projector,
                               grow_vocab=True)


# ----------------------------------------------------------------------------- saving
def hf_config(config: mc.ModelConfig) -> dict[str, Any]:
    """A LlavaConfig dict for ``config`` (llava-hf supports no dense connector)."""
    if config.dense_connector != "none":
        raise ValueError(
            f"llava-hf has no {config.dense_connector!r} dense connector; such a model can only "
            "be saved in exgra_jax's own checkpoint format"
        )
    if config.projector != "mlp2x_gelu":
        raise ValueError("llava-hf's projector is mlp2x_gelu; cannot export "
                         f"projector={config.projector!r}")
    text = dict(
        model_type=config.llm_type, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.mlp_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.resolved_head_dim, hidden_act="silu",
        max_position_embeddings=config.max_positions, rms_norm_eps=config.rms_eps,
        rope_theta=config.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False,
        pad_token_id=config.pad_token_id, bos_token_id=1, eos_token_id=2,
    )
    if config.llm_type == "mistral":
        text["sliding_window"] = config.sliding_window or None
    elif config.sliding_window:
        raise ValueError("LLaMA has no sliding window: set llm_type='mistral' to export one")
    vision = dict(
        model_type=mc.VISION_MODEL_TYPES[config.vision_type], hidden_size=config.vision_width,
        intermediate_size=config.vision_mlp, num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads, image_size=config.image_size,
        patch_size=config.patch_size, hidden_act=config.vision_act,
        layer_norm_eps=config.vision_eps, num_channels=3,
    )
    if config.vision_type == "siglip":
        vision["vision_use_head"] = False  # LLaVA reads hidden states, never the pooled head
    return dict(
        architectures=["LlavaForConditionalGeneration"], model_type="llava",
        text_config=text, vision_config=vision, image_token_index=config.image_token_id,
        projector_hidden_act="gelu", multimodal_projector_bias=config.projector_bias,
        vision_feature_layer=config.vision_select_layer,
        # 'default' drops CLIP's CLS token; SigLIP has none to drop.
        vision_feature_select_strategy="default"
        if config.vision_select_strategy == "patch" and config.vision_has_cls else "full",
        image_seq_length=config.num_image_tokens, tie_word_embeddings=config.tie_embeddings,
        pad_token_id=config.pad_token_id,
    )


def save_llava(config: mc.ModelConfig, params: dict, out_dir: str, dtype: str | None = None,
               max_shard_bytes: int = 5 * 2**30) -> None:
    """Write a llava-hf directory: config.json + (sharded) safetensors, tensor by tensor."""
    flat = flatten(params)
    write_llava(config, {p: tuple(x.shape) for p, x in flat.items()}, flat.__getitem__,
                out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)


def write_llava(config: mc.ModelConfig, shapes: dict[str, tuple[int, ...]],
                read_leaf: Callable[[str], Any], out_dir: str, dtype: str | None = None,
                max_shard_bytes: int = 5 * 2**30) -> None:
    """``save_llava`` from parameters read on demand: ``shapes`` maps each '/'-joined
    parameter path to its shape, ``read_leaf(path)`` returns that parameter. Each leaf is
    read once and only one is held at a time: the tensors of a leaf stacked over layers
    (scan) are written one after the other, so a checkpoint can be streamed to safetensors
    without ever holding the whole model."""
    cfg = hf_config(config)
    dtype = dtype or config.param_dtype
    np_dtype = NP_DTYPES[dtype]
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    os.makedirs(out_dir, exist_ok=True)
    layout = LAYOUTS["llava_hf"]

    by_leaf: dict[str, list] = {}  # our leaf path -> [(hf name, hf shape, layer, transform)]
    for ours, theirs, tname in expand(config, layout):
        path, layer = locate(ours, config.scan_layers)
        if path not in shapes:
            raise KeyError(f"params have no {path!r}; does the config match the params?")
        shape = shapes[path]
        if ours in VOCAB_PARAMS:  # Hugging Face holds vocab_size rows, not the padding
            shape = real_vocab(np.broadcast_to(np.bool_(0), shape), ours, config.vocab_size).shape
        shape = tuple(shape[1:] if layer is not None else shape)
        by_leaf.setdefault(path, []).append((theirs, tuple(TRANSFORMS[tname][2](shape)),
                                             layer, tname, ours))
    entries = [(path, *e) for path, leaf_entries in by_leaf.items() for e in leaf_entries]
    held: dict[str, Any] = {}  # the one leaf being written

    def produce(path, layer, tname, ours):
        if path not in held:
            held.clear()  # drop the previous leaf before reading the next
            held[path] = read_leaf(path)
        leaf = held[path]
        if ours in VOCAB_PARAMS:
            leaf = real_vocab(leaf, ours, config.vocab_size)
        return TRANSFORMS[tname][1](np.asarray(leaf[layer] if layer is not None else leaf))

    shards: list[list] = [[]]
    size = 0
    for e in entries:
        nbytes = int(np.prod(e[2])) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        sources = {name: (path, layer, tname, ours) for path, name, _, layer, tname, ours in shard}
        write_safetensors(
            os.path.join(out_dir, fname),
            [(name, shape, np_dtype) for _, name, shape, *_ in shard],
            lambda name, sources=sources: produce(*sources[name]),
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(sources, fname))
    held.clear()
    if len(shards) > 1:
        total = sum(int(np.prod(e[2])) * np_dtype.itemsize for e in entries)
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    elif os.path.exists(os.path.join(out_dir, "model.safetensors.index.json")):
        os.remove(os.path.join(out_dir, "model.safetensors.index.json"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
