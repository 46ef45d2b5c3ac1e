"""Tokenizer wrapper: round trips, streaming deltas, stop strings, chat templates, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from textutil import BOS_ID, EOS_ID, make_tokenizer, write_tokenizer

from meshllm.errors import ModelError, UserError
from meshllm.model.tokenizer import StreamDecoder, Tokenizer

TEXT = "héllo wörld 日本語 🙂 The quick brown fox. STOP here."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(make_tokenizer(), bos_token_id=BOS_ID, eos_token_ids=[EOS_ID])


def _stream(tok: Tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], StreamDecoder]:
    dec = tok.stream(stop=stop)
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.finish())
    return deltas, dec


def test_encode_decode_round_trip_and_specials(tok: Tokenizer, tmp_path: Path) -> None:
    ids = tok.encode(TEXT)
    assert ids[0] == BOS_ID and BOS_ID not in ids[1:]
    assert tok.decode(ids) == TEXT
    assert tok.encode(TEXT, add_special_tokens=False) == ids[1:]
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok.vocab_size == 300
    loaded = Tokenizer.from_file(write_tokenizer(tmp_path / "tokenizer.json"))
    assert loaded.encode(TEXT) == ids


def test_stream_never_splits_characters_and_concatenates_to_decode(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT, add_special_tokens=False)
    # The corpus has multi-byte characters split over byte-level tokens: the test means something.
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)
    deltas, _ = _stream(tok, ids)
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab é日🙂\n.", min_size=0, max_size=30), st.sampled_from(["ab", "é日", "\n\n", "b🙂a"]))
def test_stream_with_stop_string_matches_cutting_the_full_text(text: str, stop: str) -> None:
    tok = _TOK
    ids = tok.encode(text, add_special_tokens=False)
    deltas, dec = _stream(tok, ids, (stop,))
    full = tok.decode(ids)
    want = full.split(stop)[0]
    assert "".join(deltas) == want == dec.text
    assert dec.stopped == (stop in full)


_TOK = Tokenizer(make_tokenizer())


def test_text_that_may_begin_a_stop_string_is_held_back(tok: Tokenizer) -> None:
    dec = tok.stream(stop=["STOP here"])
    out = ""
    for i in tok.encode("fox. STO", add_special_tokens=False):
        out += dec.push(i)
    assert not out.endswith("STO") and "fox" in out  # the tail is held, the rest is released
    for i in tok.encode("P here and more", add_special_tokens=False):
        out += dec.push(i)
    assert dec.stopped and dec.stop_string == "STOP here"
    assert out + dec.finish() == "fox. "
    assert dec.push(5) == ""  # after a stop nothing more comes out


def test_held_back_text_is_flushed_when_it_turns_out_not_to_be_a_stop(tok: Tokenizer) -> None:
    deltas, dec = _stream(tok, tok.encode("fox. ST", add_special_tokens=False), ("STOP",))
    assert deltas[-1].endswith("ST") and "".join(deltas) == "fox. ST" and not dec.stopped


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("日", add_special_tokens=False)
    assert len(ids) >= 2
    deltas, _ = _stream(tok, ids[:-1])
    assert "".join(deltas) == tok.decode(ids[:-1]) and "\ufffd" in deltas[-1]


def test_special_tokens_are_skipped_in_streamed_text(tok: Tokenizer) -> None:
    deltas, _ = _stream(tok, [*tok.encode("fox", add_special_tokens=False), EOS_ID])
    assert "".join(deltas) == "fox"


HF_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_chat_template_renders_like_hugging_face(tok: Tokenizer) -> None:
    t = Tokenizer(tok.inner, bos_token_id=BOS_ID, eos_token_ids=[EOS_ID], chat_template=HF_STYLE_TEMPLATE)
    msgs = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "more"}]
    text = t.render_chat(msgs)
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\nyo</s>\n<|user|>\nmore</s>\n<|assistant|>\n"
    assert not t.render_chat(msgs, add_generation_prompt=False).endswith("<|assistant|>\n")
    ids = t.encode_chat(msgs)
    assert ids.count(BOS_ID) == 1 and ids[0] == BOS_ID  # the template's BOS, not a second one
    with pytest.raises(UserError, match="roles must alternate"):
        t.render_chat([{"role": "assistant", "content": "x"}])
    for bad in ([], [{"content": "x"}], ["x"], [{"role": "user", "content": 3}]):
        with pytest.raises(UserError):
            t.render_chat(bad)


def test_chat_template_matches_transformers(tok: Tokenizer, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=make_tokenizer(), bos_token="<s>", eos_token="</s>")
    hf.chat_template = HF_STYLE_TEMPLATE
    msgs = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "🙂"},
            {"role": "user", "content": "again"}]
    t = Tokenizer(tok.inner, bos_token_id=BOS_ID, eos_token_ids=[EOS_ID], chat_template=HF_STYLE_TEMPLATE)
    assert t.render_chat(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_default_and_broken_templates(tok: Tokenizer) -> None:
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "<s>user: hi\nassistant:"
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[0] == BOS_ID
    broken = Tokenizer(tok.inner, chat_template="{% for %}")
    with pytest.raises(ModelError, match="does not compile"):
        broken.render_chat([{"role": "user", "content": "hi"}])


def test_missing_or_corrupt_tokenizer_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="missing"):
        Tokenizer.from_file(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError, match="cannot load tokenizer") as e:
        Tokenizer.from_file(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError):
        _TOK.encode(b"bytes")  # type: ignore[arg-type]


def test_stream_keeps_the_leading_space_of_a_sentencepiece_continuation() -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    inner = HFTokenizer(models.BPE(byte_fallback=True))
    inner.pre_tokenizer = pre_tokenizers.Metaspace()
    # Llama-2 style decoder: its Strip removes the space of the first token of a decode call.
    inner.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)])
    inner.train_from_iterator(["hello world how are you"] * 20, trainer)
    t = Tokenizer(inner)
    ids = t.encode("hello world how are you", add_special_tokens=False)
    dec = t.stream(prompt_ids=ids[:1])
    out = "".join(dec.push(i) for i in ids[1:]) + dec.finish()
    assert t.decode(ids[1:]) == "world how are you"  # decoding alone loses the space...
    assert out == " world how are you"  # ...the stream, with the prompt as context, keeps it
