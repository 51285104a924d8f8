"""LLaMA-style tokenizers: load one with the LLaVA-Med special tokens, or train a small one.

LLaVA-Med v1 / ExGra-Med extend the 32000-token LLaMA sentencepiece vocabulary with four
tokens, added in this order (so a real LLaMA tokenizer gets ids 32000..32003):
`[PAD]` (the pad token), `<im_patch>` (one per image feature), `<im_start>`, `<im_end>`.

No real LLaMA tokenizer can be downloaded here, so `train_tokenizer` builds a small one with
the same design (BPE over "▁"-prefixed words, byte fallback for unseen characters through
the 256 `<0xNN>` tokens, `<unk>`=0, `<s>`=1, `</s>`=2) and saves it as a Hugging Face
tokenizer directory that `AutoTokenizer` / `LlamaTokenizer` load offline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

PAD_TOKEN = "[PAD]"
IMAGE_PATCH_TOKEN = "<im_patch>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
# The placeholder users write in a human turn; never a vocabulary token.
IMAGE_PLACEHOLDER = "<image>"

_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
_BASE_SPECIALS = ["<unk>", "<s>", "</s>"]


def add_special_tokens(tokenizer):
    """Adds `[PAD]`, `<im_patch>`, `<im_start>`, `<im_end>` when missing (LLaVA-Med order).

    Returns the same tokenizer, modified in place.
    """
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IMAGE_PATCH_TOKEN, IM_START_TOKEN, IM_END_TOKEN) if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return tokenizer


def load_tokenizer(path: str):
    """Loads a local Hugging Face tokenizer directory and adds the four special tokens."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path!r}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {path!r} has no bos/eos token; expected a LLaMA tokenizer")
    return add_special_tokens(tokenizer)


def special_token_ids(tokenizer) -> dict[str, int]:
    """The ids the data pipeline and the model need, checked to exist."""
    vocab = tokenizer.get_vocab()
    ids = {}
    for name, token in (
        ("pad", PAD_TOKEN),
        ("image_patch", IMAGE_PATCH_TOKEN),
        ("im_start", IM_START_TOKEN),
        ("im_end", IM_END_TOKEN),
    ):
        if token not in vocab:
            raise ValueError(f"tokenizer lacks {token!r}; load it with load_tokenizer()")
        ids[name] = vocab[token]
    ids["bos"] = tokenizer.bos_token_id
    ids["eos"] = tokenizer.eos_token_id
    return ids


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 2000) -> str:
    """Trains a LLaMA-style BPE tokenizer on `texts` and saves it to `out_dir`.

    `vocab_size` counts everything: the 3 base specials, the 256 byte tokens and the learned
    pieces (training may stop earlier when the corpus runs out of merges). The four LLaVA-Med
    tokens are NOT part of it, as with the real LLaMA tokenizer; `load_tokenizer` adds them.
    Returns `out_dir`.
    """
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import LlamaTokenizer

    reserved = len(_BASE_SPECIALS) + len(_BYTE_TOKENS)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must exceed {reserved} (3 specials + 256 byte tokens)")

    # Learn merges on whitespace-split words, each prefixed with "▁" as sentencepiece does.
    # Newlines stay apart and are later dropped from the vocabulary, so that, as in LLaMA,
    # "\n" is always encoded through its byte token <0x0A>.
    learner = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True))
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(_BYTE_TOKENS),
        special_tokens=_BASE_SPECIALS,
        show_progress=False,
    )
    learner.train_from_iterator(texts, trainer)
    learned = json.loads(learner.to_str())["model"]

    # LLaMA layout: specials, then the 256 byte tokens, then the pieces in merge order.
    vocab = {tok: i for i, tok in enumerate(_BASE_SPECIALS + _BYTE_TOKENS)}
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if token not in vocab and "\n" not in token:
            vocab[token] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    merges = [m for m in merges if "\n" not in m[0] + m[1]]

    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
    )
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def check_tokenizer(tokenizer, model_config) -> None:
    """The tokenizer must fit the model: same <im_patch> id, no id past the vocabulary."""
    ids = special_token_ids(tokenizer)
    if ids["image_patch"] != model_config.image_token_id:
        raise ValueError(f"the tokenizer's <im_patch> id is {ids['image_patch']} but "
                         f"model.image_token_id is {model_config.image_token_id}")
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is "
                         f"{model_config.vocab_size}")
