"""A ``tokenizers`` tokenizer.json built from a GGUF file's tokenizer metadata.

Two vocabularies, as llama.cpp names them in ``tokenizer.ggml.model``:

* ``gpt2``: byte-level BPE (tokens + merges), with the pre-tokenizer split that
  ``tokenizer.ggml.pre`` names (the regular expressions llama.cpp uses for that name).
* ``llama``: the SentencePiece-style vocabulary of Llama 1/2 and Mistral (tokens + scores, byte
  fallback tokens ``<0xNN>``), run as BPE whose merges rank pieces by their score, the way
  Hugging Face's fast Llama tokenizer runs it.

Control tokens (type 3) and user-defined tokens (type 4) become added tokens, so that text such
as ``<|im_start|>`` in a chat prompt is one token. A BOS token is prepended when the metadata's
``tokenizer.ggml.add_bos_token`` says so (its default: true for ``llama``, false for ``gpt2``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from meshllm.errors import ModelError

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=use_regex)


def _split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                    _byte_level(False)])


# tokenizer.ggml.pre -> the pre-tokenizer that splits text as llama.cpp does for that name
_PRE_TOKENIZERS = {
    "default": lambda: _byte_level(True),
    "gpt-2": lambda: _byte_level(True),
    "gpt2": lambda: _byte_level(True),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               _byte_level(True)]),
    "llama3": lambda: _split(_LLAMA3_SPLIT),
    "llama-bpe": lambda: _split(_LLAMA3_SPLIT),
    "qwen2": lambda: _split(_QWEN2_SPLIT),
}


def _get(meta: Mapping[str, Any], key: str, default: Any = None) -> Any:
    v = meta.get(key, default)
    return default if v is None else v


def build_tokenizer(meta: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer the GGUF metadata describes; ``ModelError`` for what it cannot represent."""
    kind = _get(meta, "tokenizer.ggml.model")
    tokens = _get(meta, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ModelError("the GGUF file has no tokenizer (tokenizer.ggml.model / tokens missing)")
    tokens = [str(t) for t in tokens]
    types = list(_get(meta, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens)))
    if len(types) != len(tokens):
        raise ModelError("GGUF tokenizer: token_type and tokens differ in length")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if kind == "gpt2":
        tok = _bpe(meta, tokens, vocab)
        add_bos_default = False
    elif kind == "llama":
        tok = _spm(meta, tokens, types, vocab)
        add_bos_default = True
    else:
        raise ModelError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 or llama)")
    specials = [AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types, strict=True) if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_USER_DEFINED]
    tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)
    bos = _get(meta, "tokenizer.ggml.bos_token_id")
    if bool(_get(meta, "tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None:
        if not 0 <= int(bos) < len(tokens):
            raise ModelError(f"GGUF tokenizer: bos_token_id {bos} is outside the vocabulary")
        b = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1", special_tokens=[(b, int(bos))])
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _bpe(meta: Mapping[str, Any], tokens: list[str], vocab: dict[str, int]) -> Tokenizer:
    pre = str(_get(meta, "tokenizer.ggml.pre", "default"))
    if pre not in _PRE_TOKENIZERS:
        raise ModelError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported "
                         f"(known: {', '.join(sorted(_PRE_TOKENIZERS))})")
    raw_merges = _get(meta, "tokenizer.ggml.merges")
    if raw_merges is None:
        raise ModelError("GGUF tokenizer: a gpt2 vocabulary needs tokenizer.ggml.merges")
    merges: list[tuple[str, str]] = []
    for m in raw_merges:
        a, sep, b = str(m).partition(" ")
        if not sep:
            raise ModelError(f"GGUF tokenizer: malformed merge {m!r}")
        merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                               ignore_merges=pre in ("llama3", "llama-bpe")))
    tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece vocabulary: every split of a piece into two
    pieces of the vocabulary, ranked by the merged piece's score (highest first), ties by id."""
    found: list[tuple[float, int, int, str, str]] = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((-float(scores[i]), vocab[left], vocab[right], left, right))
    found.sort(key=lambda m: (m[0], m[1], m[2]))
    return [(a, b) for *_, a, b in found]


def _spm(meta: Mapping[str, Any], tokens: list[str], types: list[int], vocab: dict[str, int]) -> Tokenizer:
    scores = list(_get(meta, "tokenizer.ggml.scores", []))
    if len(scores) != len(tokens):
        raise ModelError("GGUF tokenizer: a llama vocabulary needs one score per token")
    unk_id = int(_get(meta, "tokenizer.ggml.unknown_token_id", 0))
    unk = tokens[unk_id] if 0 <= unk_id < len(tokens) else None
    # merges only among pieces that can be merged (not control, byte or unknown tokens)
    mergeable = {t: i for t, i in vocab.items() if types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(mergeable, scores), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    space_prefix = bool(_get(meta, "tokenizer.ggml.add_space_prefix", True))
    # as Hugging Face's Llama tokenizer: spaces become "▁" and the text gets one leading "▁"
    # unless it already starts with a space
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", split=False,
                                                 prepend_scheme="first" if space_prefix else "never")
    dec: list[decoders.Decoder] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    return tok
