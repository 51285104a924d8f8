"""Model configuration: one frozen dataclass for the vision tower, connector and LLM.

Hidden-state indices follow transformers' ``hidden_states`` convention: index 0 is the
embedding output (after CLIP's pre-LayerNorm), index i the output of layer i.

Backbones: the vision tower is CLIP (class token, pre-LayerNorm) or SigLIP (no class
token); the text model is LLaMA or Mistral, the same decoder (Mistral adds an optional
sliding attention window), recorded so that exports name the right architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any

PROJECTORS = ("linear", "mlp2x_gelu", "identity")
DENSE_CONNECTORS = ("none", "dci", "sci", "sti")
SELECT_STRATEGIES = ("patch", "cls_patch")
VISION_TYPES = ("clip", "siglip")
LLM_TYPES = ("llama", "mistral")
REMAT_POLICIES = ("none", "full", "minimal", "save_dots")
DTYPES = ("float32", "bfloat16", "float16")
# "auto" picks per platform at trace time: exgra_jax.models.layers.resolve_attention_impl.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # --- vision tower (CLIP or SigLIP ViT) ---
    vision_type: str = "clip"
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    vision_eps: float = 1e-5
    vision_act: str = "quick_gelu"
    # Layer whose hidden states feed the connector; negative counts from the end
    # (-2 = the second-to-last layer, as LLaVA does).
    vision_select_layer: int = -2
    # "patch": the patch tokens (CLIP's CLS dropped); "cls_patch" keeps CLIP's CLS token.
    vision_select_strategy: str = "patch"

    # --- connector ---
    projector: str = "mlp2x_gelu"
    projector_bias: bool = True
    dense_connector: str = "none"
    # DCI: channel-concat of the selected layer with the mean of each hidden-state range.
    dci_ranges: tuple[tuple[int, int], ...] = ((0, 12), (12, 24))
    # SCI / STI: the extra hidden-state layers.
    sci_layers: tuple[int, ...] = (7, 15)
    sti_layers: tuple[int, ...] = (7, 15)
    sti_pool: int = 8  # window and stride of the token pooling in STI

    # --- language model (LLaMA or Mistral) ---
    llm_type: str = "llama"
    vocab_size: int = 32004
    # Rows of the embedding and LM head are rounded up to a multiple of this (1: none), so
    # that a mesh axis can split the vocabulary; padded logits are masked out.
    vocab_pad_multiple: int = 1
    hidden_size: int = 4096
    mlp_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    max_positions: int = 2048
    sliding_window: int = 0  # > 0: a token attends to the last `sliding_window` positions
    tie_embeddings: bool = False

    # --- multimodal ---
    image_token_id: int = 32001  # <im_patch> in the LLaVA-Med v1 vocabulary
    pad_token_id: int = 32000

    # --- numerics and memory ---
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # master weights
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS

    def __post_init__(self):
        _check(self.projector in PROJECTORS, f"projector must be one of {PROJECTORS}")
        _check(
            self.dense_connector in DENSE_CONNECTORS,
            f"dense_connector must be one of {DENSE_CONNECTORS}",
        )
        _check(
            self.vision_select_strategy in SELECT_STRATEGIES,
            f"vision_select_strategy must be one of {SELECT_STRATEGIES}",
        )
        _check(self.vision_type in VISION_TYPES, f"vision_type must be one of {VISION_TYPES}")
        _check(self.llm_type in LLM_TYPES, f"llm_type must be one of {LLM_TYPES}")
        _check(self.sliding_window >= 0, "sliding_window must be >= 0 (0: no window)")
        _check(
            self.vision_has_cls or self.vision_select_strategy == "patch",
            "a SigLIP tower has no CLS token: use vision_select_strategy='patch'",
        )
        _check(self.attention_impl in ATTENTION_IMPLS,
               f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        _check(self.vocab_pad_multiple >= 1, "vocab_pad_multiple must be >= 1 (1: no padding)")
        _check(self.remat_policy in REMAT_POLICIES, f"remat_policy must be one of {REMAT_POLICIES}")
        _check(self.dtype in DTYPES and self.param_dtype in DTYPES, f"dtypes must be in {DTYPES}")
        _check(self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size")
        _check(self.vision_width % self.vision_heads == 0, "vision_width % vision_heads != 0")
        _check(self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads")
        _check(
            self.head_dim > 0 or self.hidden_size % self.num_heads == 0,
            "hidden_size must be a multiple of num_heads (or set head_dim)",
        )
        _check(0 <= self.image_token_id < self.vocab_size, "image_token_id must lie in the vocabulary")
        _check(
            -self.vision_layers <= self.vision_select_layer <= self.vision_layers,
            f"vision_select_layer {self.vision_select_layer} is outside 0..{self.vision_layers}",
        )
        for i in self.needed_hidden_states:
            _check(
                0 <= i <= self.vision_layers,
                f"the {self.dense_connector} connector needs hidden state {i}, but the tower "
                f"has only {self.vision_layers} layers",
            )
        _check(
            self.dense_connector == "none" or self.vision_select_strategy == "patch",
            "dense connectors drop the CLS token everywhere: use vision_select_strategy='patch'",
        )
        if self.dense_connector == "sti":
            _check(
                self.num_patches % self.sti_pool == 0,
                f"sti_pool {self.sti_pool} must divide the {self.num_patches} patches",
            )
        if self.projector == "identity":
            _check(
                self.connector_in_dim == self.hidden_size,
                f"identity projector needs connector width {self.connector_in_dim} == "
                f"hidden_size {self.hidden_size}",
            )

    # --- derived quantities ---
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and LM head: vocab_size rounded up to vocab_pad_multiple."""
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    @property
    def vision_has_cls(self) -> bool:
        """CLIP prepends a class token to the patches; SigLIP does not."""
        return self.vision_type == "clip"

    @property
    def vision_positions(self) -> int:
        """Rows of the vision position embedding."""
        return self.num_patches + (1 if self.vision_has_cls else 0)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def select_layer_index(self) -> int:
        """The selected layer as a non-negative index into hidden_states (0..vision_layers)."""
        n = self.vision_layers + 1
        return self.vision_select_layer % n

    @property
    def needed_hidden_states(self) -> tuple[int, ...]:
        """Every hidden-state index the connector reads."""
        idx = {self.select_layer_index}
        if self.dense_connector == "dci":
            for lo, hi in self.dci_ranges:
                idx.update(range(lo, hi))
        elif self.dense_connector == "sci":
            idx.update(self.sci_layers)
        elif self.dense_connector == "sti":
            idx.update(self.sti_layers)
        return tuple(sorted(idx))

    @property
    def vision_layers_to_run(self) -> int:
        """Layers that affect the output: the tower stops after the deepest one needed."""
        return max(self.needed_hidden_states)

    @property
    def num_image_tokens(self) -> int:
        """Tokens an image occupies in the LLM sequence."""
        n = self.num_patches + (1 if self.vision_select_strategy == "cls_patch" else 0)
        if self.dense_connector == "sti":
            n += len(self.sti_layers) * (self.num_patches // self.sti_pool)
        return n

    @property
    def connector_in_dim(self) -> int:
        """Channels entering the projector."""
        if self.dense_connector == "dci":
            return self.vision_width * (1 + len(self.dci_ranges))
        if self.dense_connector == "sci":
            return self.vision_width * (1 + len(self.sci_layers))
        return self.vision_width

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "attention_impl" in d and d["attention_impl"] is None:
            d["attention_impl"] = "auto"  # runs saved before the backends had names
        for key in ("dci_ranges",):
            if key in d:
                d[key] = tuple(tuple(r) for r in d[key])
        for key in ("sci_layers", "sti_layers"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"ModelConfig: {message}")


def llava_med_7b(**overrides: Any) -> ModelConfig:
    """LLaVA-Med v1 / ExGra-Med: CLIP ViT-L/14 at 224 px, mlp2x_gelu, LLaMA-7B (vocab 32004)."""
    return ModelConfig(**overrides)


def llava_med_v15_7b(**overrides: Any) -> ModelConfig:
    """LLaVA-Med v1.5 (llava_mistral): CLIP ViT-L/14 at 336 px (576 image tokens),
    mlp2x_gelu, Mistral-7B (GQA 32/8 heads, MLP 14336, rope_theta 1e6, RMS eps 1e-5, no
    sliding window), its 32000-token vocabulary plus LLaVA-Med v1's four tokens (as
    `convert.hf.load_llava_med` appends them)."""
    base = dict(image_size=336, llm_type="mistral", mlp_size=14336, num_kv_heads=8,
                rope_theta=1e6, rms_eps=1e-5, max_positions=32768, sliding_window=0)
    base.update(overrides)
    return ModelConfig(**base)


def tiny(**overrides: Any) -> ModelConfig:
    """A few-thousand-parameter model for tests: every code path, small shapes."""
    base = dict(
        image_size=32,
        patch_size=8,
        vision_width=32,
        vision_layers=4,
        vision_heads=4,
        vision_mlp=64,
        dci_ranges=((0, 2), (2, 4)),
        sci_layers=(1, 2),
        sti_layers=(1, 2),
        sti_pool=4,
        vocab_size=128,
        hidden_size=64,
        mlp_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_positions=256,
        image_token_id=100,
        pad_token_id=0,
    )
    base.update(overrides)
    return ModelConfig(**base)


PRESETS = {"tiny": tiny, "llava_med_7b": llava_med_7b, "llava_med_v15_7b": llava_med_v15_7b}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


def _rope_theta(text: dict[str, Any]) -> float:
    # transformers >= 5 moved rope_theta into rope_parameters.
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if params and params.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"unsupported RoPE scaling {params!r}; only plain RoPE is implemented")
    return float(params.get("rope_theta", text.get("rope_theta", 10000.0)))


def text_fields_from_hf(text: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields from a LlamaConfig or MistralConfig dict."""
    llm_type = text.get("model_type") or "llama"
    if llm_type not in LLM_TYPES:
        raise ValueError(f"unsupported text model_type {llm_type!r}; supported: {LLM_TYPES}")
    heads = text["num_attention_heads"]
    hidden = text["hidden_size"]
    head_dim = text.get("head_dim") or hidden // heads
    return dict(
        llm_type=llm_type,
        sliding_window=int(text.get("sliding_window") or 0) if llm_type == "mistral" else 0,
        vocab_size=text["vocab_size"],
        hidden_size=hidden,
        mlp_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=0 if head_dim == hidden // heads else head_dim,
        rope_theta=_rope_theta(text),
        rms_eps=text.get("rms_norm_eps", 1e-6),
        max_positions=text.get("max_position_embeddings", 2048),
        tie_embeddings=bool(text.get("tie_word_embeddings", False)),
    )


def vision_fields_from_hf(vision: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields from a CLIPVisionConfig or SiglipVisionConfig dict."""
    kind = vision.get("model_type") or "clip_vision_model"
    if kind not in VISION_MODEL_TYPES.values():
        raise ValueError(f"unsupported vision model_type {kind!r}; supported: "
                         f"{sorted(VISION_MODEL_TYPES.values())}")
    siglip = kind == VISION_MODEL_TYPES["siglip"]
    return dict(
        vision_type="siglip" if siglip else "clip",
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        vision_width=vision["hidden_size"],
        vision_layers=vision["num_hidden_layers"],
        vision_heads=vision["num_attention_heads"],
        vision_mlp=vision["intermediate_size"],
        vision_eps=vision.get("layer_norm_eps", 1e-6 if siglip else 1e-5),
        vision_act=vision.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu"),
    )


# transformers' model_type of each vision tower's config.
VISION_MODEL_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


def from_hf(config_dict: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from a llava-hf ``config.json`` dict (LlavaConfig)."""
    if config_dict.get("model_type") != "llava":
        raise ValueError(
            f"from_hf expects a llava-hf config (model_type 'llava'), got "
            f"{config_dict.get('model_type')!r}; LLaVA-Med v1 and CLIP + LLaMA directories "
            "are read by exgra_jax.convert.hf"
        )
    text, vision = config_dict["text_config"], config_dict["vision_config"]
    vision_fields = vision_fields_from_hf(vision)
    strategy = config_dict.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
    if vision_fields["vision_type"] == "siglip" and strategy != "full":
        # 'default' drops the first token, which in SigLIP is a real patch.
        raise ValueError("a SigLIP tower without a CLS token needs "
                         "vision_feature_select_strategy 'full'")
    layer = config_dict.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError("a list of vision_feature_layer values is not supported")
    if config_dict.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError("only the GELU projector (mlp2x_gelu) is supported")
    fields = dict(
        **vision_fields,
        **text_fields_from_hf(text),
        vision_select_layer=layer,
        vision_select_strategy="patch"
        if strategy == "default" or vision_fields["vision_type"] == "siglip" else "cls_patch",
        projector="mlp2x_gelu",
        projector_bias=config_dict.get("multimodal_projector_bias", True),
        image_token_id=config_dict.get("image_token_index", config_dict.get("image_token_id")),
        pad_token_id=config_dict.get("pad_token_id") or text.get("pad_token_id") or 0,
    )
    fields["tie_embeddings"] = bool(
        config_dict.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    )
    fields.update(overrides)
    return ModelConfig(**fields)
