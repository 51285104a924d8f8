"""LlavaModel: CLIP tower -> connector -> projector, spliced into LLaMA's input embeddings.

Image features replace the embeddings at image-token positions, in order: the k-th image
token of an example receives the k-th feature vector of its image. This is done with a
cumulative count and a gather, so shapes stay static and an example without image tokens
is left untouched.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from exgra_jax.models.clip import VisionTower
from exgra_jax.models.config import ModelConfig
from exgra_jax.models.connector import Projector, select_features
from exgra_jax.models.llama import KVCache, LlamaModel


def splice_image_features(
    embeds_btd: jax.Array, input_ids_bt: jax.Array, features_bpd: jax.Array, image_token_id: int
) -> jax.Array:
    """Put features_bpd[b, k] at the k-th position of example b where input_ids == image token.

    Image tokens beyond the number of features reuse the last feature; the data pipeline
    emits exactly ``num_image_tokens`` of them per image.
    """
    is_image = input_ids_bt == image_token_id
    idx = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features_bpd.shape[1] - 1)
    gathered = jnp.take_along_axis(features_bpd, idx[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(embeds_btd.dtype), embeds_btd)


class LlavaModel(nn.Module):
    config: ModelConfig

    def setup(self):
        self.vision_tower = VisionTower(self.config)
        self.projector = Projector(self.config)
        self.llm = LlamaModel(self.config)

    # --- pieces the train step and the alignment loss compose ---
    def encode_images(self, pixel_values_bhwc: jax.Array) -> jax.Array:
        """Projected image features [b, num_image_tokens, hidden_size]."""
        hidden = self.vision_tower(pixel_values_bhwc)
        return self.projector(select_features(self.config, hidden))

    def embed_multimodal(self, input_ids_bt, pixel_values_bhwc=None):
        """(embeddings with image features spliced in, image features or None).

        ``pixel_values`` is [b, h, w, 3] (one image per row) or [b, i, h, w, 3] (packed
        rows: i images per row, in the order of the row's image-token blocks); the
        features are then [b, i, num_image_tokens, d] and a row's k-th image token gets
        the k-th feature of its images laid end to end.
        """
        embeds = self.llm.embed(input_ids_bt)
        if pixel_values_bhwc is None:
            return embeds, None
        if pixel_values_bhwc.ndim == 5:
            b, i = pixel_values_bhwc.shape[:2]
            features = self.encode_images(pixel_values_bhwc.reshape(b * i, *pixel_values_bhwc.shape[2:]))
            features = features.reshape(b, i, *features.shape[1:])
            flat = features.reshape(b, -1, features.shape[-1])
        else:
            features = flat = self.encode_images(pixel_values_bhwc)
        return splice_image_features(embeds, input_ids_bt, flat, self.config.image_token_id), \
            features

    def text_hidden_states(self, input_ids_bt, attention_mask_bt=None, positions_bt=None,
                           segment_ids_bt=None):
        """Final normed hidden states of text-only sequences [b, t, hidden_size]; with
        ``segment_ids_bt`` and ``positions_bt`` a row holds several packed sequences."""
        h, _ = self.llm.decode(self.llm.embed(input_ids_bt), attention_mask_bt, positions_bt,
                               segment_ids_bt=segment_ids_bt)
        return h

    def text_embeddings(self, input_ids_bt):
        """Token embeddings only (the alignment branch that skips the LLM)."""
        return self.llm.embed(input_ids_bt)

    def logits_from_hidden(self, h_btd):
        return self.llm.logits(h_btd)

    def decode_step(
        self,
        input_ids_bt: jax.Array,
        pixel_values_bhwc: jax.Array | None,
        positions_bt: jax.Array,
        cache: KVCache,
        cache_index: jax.Array,
        cache_mask_bs: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """Run ``input_ids`` through the decoder at ``cache_index`` (prefill or one step)."""
        embeds, _ = self.embed_multimodal(input_ids_bt, pixel_values_bhwc)
        h, cache = self.llm.decode(
            embeds, positions_bt=positions_bt, cache=cache, cache_index=cache_index,
            cache_mask_bs=cache_mask_bs,
        )
        return self.llm.logits(h), cache

    def forward_features(self, input_ids_bt, pixel_values_bhwc=None, attention_mask_bt=None,
                         positions_bt=None, segment_ids_bt=None):
        """(logits [b, t, vocab], projected image features [b, p, d] or None); packed rows
        pass ``segment_ids_bt`` and ``positions_bt`` and [b, i, h, w, 3] pixels, and get
        features [b, i, p, d]."""
        embeds, features = self.embed_multimodal(input_ids_bt, pixel_values_bhwc)
        h, _ = self.llm.decode(embeds, attention_mask_bt, positions_bt,
                               segment_ids_bt=segment_ids_bt)
        return self.llm.logits(h), features

    def __call__(self, input_ids_bt, pixel_values_bhwc=None, attention_mask_bt=None):
        """Logits [batch, seq, vocab] (float32)."""
        return self.forward_features(input_ids_bt, pixel_values_bhwc, attention_mask_bt)[0]


def init_boxed_params(config: ModelConfig, rng: jax.Array, batch: int = 1, seq: int = 8):
    """Random parameters boxed with their logical axis names (flax's partitioning)."""
    ids = jnp.zeros((batch, seq), jnp.int32)
    pix = jnp.zeros((batch, config.image_size, config.image_size, 3), jnp.float32)
    return LlavaModel(config).init(rng, ids, pix, jnp.ones_like(ids))["params"]


def init_params(config: ModelConfig, rng: jax.Array, batch: int = 1, seq: int = 8):
    """Random parameters (boxed logical-partitioning metadata removed)."""
    return nn.unbox(init_boxed_params(config, rng, batch, seq))


def abstract_params(config: ModelConfig, boxed: bool = False) -> dict:
    """The parameter tree's ShapeDtypeStructs, nothing allocated (``boxed``: with their
    logical axis names)."""
    params = jax.eval_shape(lambda: init_boxed_params(config, jax.random.key(0)))
    return params if boxed else nn.unbox(params)
