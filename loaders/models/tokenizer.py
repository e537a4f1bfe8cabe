"""Rebuilding a Hugging Face ``tokenizers`` BPE tokenizer from a GGUF's own tokenizer metadata, and
writing that metadata from a Hugging Face tokenizer folder.

llama.cpp stores the byte-level vocabulary (``tokenizer.ggml.tokens``, in id order), the token
types and the merges; with the pre-tokenizer regex named by ``tokenizer.ggml.pre`` that is all a
byte-level BPE needs, so the ids come from the file the user loaded rather than a bundled copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..gguf.errors import GGUFError
from ..gguf.reader import GGUFFile, StringArray, describe

# Pre-tokenizer rule -> its split regex.
PRE_TOKENIZERS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
# tokenizer.ggml.pre values -> the rule llama.cpp applies for them (llama-vocab.cpp): converters name
# the pre-tokenizer after the model, so fine-tunes of Qwen carry names of their own.
PRE_TOKENIZER_NAMES = {"qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "kormo": "qwen2", "f2llmv2": "qwen2",
                       "megrez": "qwen2"}

# llama.cpp token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def has_tokenizer(gguf: GGUFFile) -> bool:
    return gguf.get("tokenizer.ggml.tokens") is not None and gguf.get("tokenizer.ggml.merges") is not None


def _strings(gguf: GGUFFile, key: str) -> list[str]:
    value = gguf.get(key)
    if not isinstance(value, StringArray):
        raise GGUFError(gguf.path, f"corrupt header: {key} is {describe(value)}, not an array of strings")
    return value.tolist()


def _token_types(gguf: GGUFFile, n_tokens: int) -> list[int]:
    types = gguf.get("tokenizer.ggml.token_type")
    if types is None:
        return [NORMAL] * n_tokens
    if not isinstance(types, np.ndarray) or types.dtype.kind not in "iu" or len(types) != n_tokens:
        raise GGUFError(gguf.path, f"corrupt header: tokenizer.ggml.token_type is not an array of {n_tokens:,} "
                                   "integers (one per token)")
    return [int(t) for t in types]


def build_tokenizer(gguf: GGUFFile) -> Tokenizer:
    """The file's tokenizer; GGUFError naming the file when its tokenizer metadata is damaged."""
    try:
        return _build(gguf)
    except GGUFError:
        raise
    except Exception as e:  # the tokenizers library's own errors: a merge or token it refuses
        raise GGUFError(gguf.path, f"its tokenizer metadata does not make a tokenizer: {e}") from None


def _build(gguf: GGUFFile) -> Tokenizer:
    model = gguf.get_str("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(gguf.path, f"tokenizer model {model!r} is not a byte-level BPE (expected 'gpt2')")
    pre = gguf.get_str("tokenizer.ggml.pre", "qwen2")
    if pre not in PRE_TOKENIZER_NAMES:
        raise GGUFError(gguf.path, f"tokenizer pre-tokenizer {pre!r} is not supported "
                                   f"(supported: {', '.join(PRE_TOKENIZER_NAMES)})")
    rule = PRE_TOKENIZERS[PRE_TOKENIZER_NAMES[pre]]
    tokens = _strings(gguf, "tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError(gguf.path, "corrupt tokenizer: tokenizer.ggml.tokens is empty")
    types = _token_types(gguf, len(tokens))
    vocab = {}
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind in (NORMAL, CONTROL, USER_DEFINED):
            if text in vocab:  # one of the two ids could never be produced (a chat marker split into bytes)
                raise GGUFError(gguf.path, f"corrupt tokenizer: tokens {vocab[text]} and {i} are both {text[:40]!r}")
            vocab[text] = i
    merge_list = _strings(gguf, "tokenizer.ggml.merges")
    # A byte-level BPE's vocabulary beyond its 256 bytes is made of merges: without them every prompt
    # would be encoded byte by byte, into ids the model never saw together.
    if not merge_list and sum(kind == NORMAL for kind in types) > 256:
        raise GGUFError(gguf.path, f"corrupt tokenizer: {len(tokens):,} tokens but tokenizer.ggml.merges is empty")
    merges = []
    for i, merge in enumerate(merge_list):
        pair = tuple(merge.split(" ", 1))
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise GGUFError(gguf.path, f"corrupt tokenizer: merge {i} ({merge[:40]!r}) names a token that is not in "
                                       "the vocabulary")
        merges.append(pair)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rule), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Added tokens are matched whole before BPE; control ones are "special" (skipped when decoding).
    # One call per kind: each call rebuilds the library's matcher of all added tokens.
    for kind, add in ((CONTROL, tok.add_special_tokens), (USER_DEFINED, tok.add_tokens)):
        add([AddedToken(text, special=kind == CONTROL, normalized=False, lstrip=False, rstrip=False,
                        single_word=False) for text, k in zip(tokens, types) if k == kind])
    return tok


def gguf_tokenizer_metadata(folder: Path, vocab_size: int) -> dict:
    """tokenizer.ggml.* as llama.cpp's converter writes them for a Qwen model from its Hugging Face
    tokenizer folder (vocab.json, merges.txt, tokenizer_config.json): tokens in id order, padded with
    unused ones up to the model's ``vocab_size`` rows."""
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        merges = [line for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
                  if line and not line.startswith("#version")]
    except (OSError, ValueError) as e:
        raise GGUFError(folder, f"not a Hugging Face tokenizer folder (vocab.json, merges.txt, tokenizer_config.json): {e}") from None
    by_id = {i: (t, NORMAL) for t, i in vocab.items()}
    try:
        for i, spec in config.get("added_tokens_decoder", {}).items():
            by_id[int(i)] = (spec["content"], CONTROL if spec.get("special") else USER_DEFINED)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise GGUFError(folder / "tokenizer_config.json", "its added_tokens_decoder is not a map of token ids to "
                                                         "{\"content\": ..., \"special\": ...}") from None
    tokens, types = zip(*(by_id.get(i, (f"[PAD{i}]", UNUSED)) for i in range(vocab_size)))
    ids = {t: i for i, t in enumerate(tokens)}
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": list(tokens),
            "tokenizer.ggml.token_type": list(types), "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.add_bos_token": bool(config.get("add_bos_token", False))}
    for role in ("eos", "pad", "bos"):
        token = config.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token in ids:
            meta[f"tokenizer.ggml.{'padding' if role == 'pad' else role}_token_id"] = ids[token]
    return meta
