"""Text <-> token ids: Hugging Face ``tokenizers`` loaded from ``tokenizer.json``.

Three things beyond encode/decode:

- ``StreamDecoder``: per-request streaming detokenisation. Deltas never split a multi-byte UTF-8
  character or a byte-level BPE piece (``tokenizers.decoders.DecodeStream`` buffers those), and
  text that could be the start of a stop string is held back until it is known not to be one.
- ``render_chat``: Hugging Face-style chat templates (jinja2, sandboxed) over a ``messages`` list.
- Special tokens: BOS/EOS ids come from the model config (the manifest), which the checkpoint
  import fills from the checkpoint's own config.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers.decoders import DecodeStream

from meshllm.errors import ModelError, UserError

if TYPE_CHECKING:
    from meshllm.model.manifest import Manifest

# Used when a model ships no chat template: BOS, then plain "role: content" turns.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


# Conventional names, used only when the model config gives no id.
BOS_NAMES = ("<s>", "<|bos|>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
EOS_NAMES = ("</s>", "<|eos|>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>")


def _first_special(inner: tokenizers.Tokenizer, names: Sequence[str]) -> int | None:
    specials = {t.content: i for i, t in inner.get_added_tokens_decoder().items() if t.special}
    for n in names:
        if n in specials:
            return int(specials[n])
    return None


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the model's special tokens and chat template."""

    def __init__(self, inner: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_ids: Iterable[int] = (), chat_template: str | None = None) -> None:
        self.inner = inner
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(int(i) for i in eos_token_ids)
        self.chat_template = chat_template
        self._template: Any = None  # compiled lazily: most uses never render a chat

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, *, bos_token_id: int | None = None,
                  eos_token_ids: Iterable[int] = (), chat_template: str | None = None) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"tokenizer file missing: {path}")
        try:
            inner = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad JSON
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelError(f"cannot load tokenizer {path}: {first}") from None
        return cls(inner, bos_token_id=bos_token_id, eos_token_ids=eos_token_ids,
                   chat_template=chat_template)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> Tokenizer:
        path = manifest.tokenizer_path
        if path is None:
            raise ModelError(f"model {manifest.name!r} in {manifest.root} has no tokenizer "
                             f"(export it with a tokenizer.json to generate text)")
        cfg = manifest.config
        tok = cls.from_file(path, bos_token_id=cfg.bos_token_id, eos_token_ids=cfg.eos_token_ids,
                            chat_template=manifest.chat_template)
        # A model exported without special-token ids (random weights plus a tokenizer file)
        # still stops at its tokenizer's conventional end-of-text token.
        if tok.bos_token_id is None:
            tok.bos_token_id = _first_special(tok.inner, BOS_NAMES)
        if not tok.eos_token_ids:
            eos = _first_special(tok.inner, EOS_NAMES)
            tok.eos_token_ids = (eos,) if eos is not None else ()
        return tok

    # --- basics ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.inner.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids. ``add_special_tokens`` runs the tokenizer's own post-processor (which
        adds BOS for Llama-style tokenizers); chat prompts already carry their specials."""
        if not isinstance(text, str):
            raise UserError(f"prompt must be a string, got {type(text).__name__}")
        return list(self.inner.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.inner.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.inner.id_to_token(int(token_id))

    @property
    def bos_token(self) -> str:
        return (self.id_to_token(self.bos_token_id) or "") if self.bos_token_id is not None else ""

    @property
    def eos_token(self) -> str:
        return (self.id_to_token(self.eos_token_ids[0]) or "") if self.eos_token_ids else ""

    def stream(self, *, stop: Sequence[str] = (), prompt_ids: Sequence[int] = (),
               skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, stop=stop, prompt_ids=prompt_ids,
                             skip_special_tokens=skip_special_tokens)

    # --- chat -----------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                    **kwargs: Any) -> str:
        """Render a Hugging Face-style ``messages`` list with the model's chat template."""
        _check_messages(messages)
        if self._template is None:
            self._template = _compile_template(self.chat_template or DEFAULT_CHAT_TEMPLATE)
        try:
            return str(self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, **kwargs))
        except _TemplateRaised as e:
            raise UserError(f"chat template rejected the conversation: {e}") from None
        except Exception as e:  # a template that breaks on valid messages is the model's fault
            raise ModelError(f"chat template failed: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        # The template writes BOS itself (HF templates use {{ bos_token }}): do not add another.
        return self.encode(text, add_special_tokens=False)


class _TemplateRaised(Exception):
    """``raise_exception(...)`` called from inside a chat template."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # HF's tojson does not escape HTML, unlike jinja2's built-in filter.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> Any:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The same environment Hugging Face transformers builds, so their templates render alike.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ModelError(f"chat template does not compile: {e}") from None


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"messages[{i}] must be an object with 'role' and 'content'")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise UserError(f"messages[{i}].role must be a non-empty string")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise UserError(f"messages[{i}].content must be a string")


class StreamDecoder:
    """Turns generated token ids into text deltas, one request at a time.

    ``push(id)`` returns the text that is now safe to show (possibly ""). When a stop string
    appears, ``push`` returns the text before it, ``stopped`` becomes True, and the stop string
    and anything after it are dropped. ``finish()`` returns whatever was held back (the tail
    that might have begun a stop string, and any incomplete character as U+FFFD).
    The concatenation of all deltas is the decoded text, cut at the first stop string.
    """

    def __init__(self, tokenizer: Tokenizer, *, stop: Sequence[str] = (),
                 prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.skip_special_tokens = skip_special_tokens
        # A few prompt ids give the decoder its left context (leading-space rules of
        # SentencePiece-style decoders depend on whether a token starts the text).
        context = [int(i) for i in prompt_ids[-4:]]
        self._stream = DecodeStream(ids=context or None, skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._undecoded: list[int] = []  # ids the DecodeStream is still buffering
        self._pending = ""  # decoded, not yet emitted (might start a stop string)
        self.text = ""  # everything emitted so far
        self.stopped = False
        self.stop_string: str | None = None

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        token_id = int(token_id)
        self._ids.append(token_id)
        self._undecoded.append(token_id)
        # An id past the tokenizer's vocabulary (models pad their embedding) decodes to nothing.
        chunk = self._stream.step(self.tokenizer.inner, token_id)
        if chunk is None:
            return ""
        self._undecoded.clear()
        self._pending += chunk
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: flush what was held back."""
        if self.stopped:
            return ""
        if self._undecoded:
            # Bytes that never completed a character: show them as the tokenizer would.
            self._pending += self.tokenizer.decode(self._undecoded,
                                                   skip_special_tokens=self.skip_special_tokens)
            self._undecoded.clear()
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        pending = self._pending
        cut = _first_stop(pending, self.stop)
        if cut is not None:
            idx, s = cut
            out = pending[:idx]
            self._pending = ""
            self.stopped = True
            self.stop_string = s
        elif final:
            out, self._pending = pending, ""
        else:
            hold = _held_suffix(pending, self.stop)
            out, self._pending = pending[: len(pending) - hold], pending[len(pending) - hold:]
        self.text += out
        return out


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def _held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
