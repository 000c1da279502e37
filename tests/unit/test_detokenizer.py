"""IncrementalDetokenizer against full decodes of a tiny byte-level BPE tokenizer trained offline."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tokenization.detokenizer import IncrementalDetokenizer

WORDS = ["héllo", "wörld", "你好", "🙂", "the", "cat", "sat", "on", "mat", "café", "straße", "日本語"]
ALPHABET = list("ab cé.\nöß你好日🙂") + ["ab", "你好", "héllo", "🙂🙂"]
EOS = "<|eos|>"


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte maps to one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return chars


def _build_tokenizer() -> PreTrainedTokenizerFast:
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(300)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, clean_up_tokenization_spaces=False)


TOKENIZER = _build_tokenizer()
VOCAB_SIZE = len(TOKENIZER)
EOS_ID = TOKENIZER.convert_tokens_to_ids(EOS)
BYTE_IDS = {b: TOKENIZER.convert_tokens_to_ids(c) for b, c in _byte_to_char().items()}
PROMPT = TOKENIZER.encode("the cat sat on 你好", add_special_tokens=False)


def _byte_ids(text: str) -> list[int]:
    return [BYTE_IDS[b] for b in text.encode()]


def _encode(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False)


@st.composite
def split_texts(draw: st.DrawFn) -> tuple[str, list[int]]:
    """A text and its ids, each piece either BPE-encoded or split into single-byte tokens."""
    pieces = draw(st.lists(st.sampled_from(ALPHABET), max_size=25))
    ids: list[int] = []
    for piece in pieces:
        ids += _byte_ids(piece) if draw(st.booleans()) else _encode(piece)
    return "".join(pieces), ids


def _stream(det: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    chunks = [det.add(token_id) for token_id in ids]
    return [*chunks, det.flush()]


def test_tokenizer_is_byte_level_and_splits_characters() -> None:
    assert BYTE_IDS[0xE4] != BYTE_IDS[0xBD]
    assert TOKENIZER.decode(_byte_ids("你")[:2]) == "\ufffd"
    assert TOKENIZER.decode(_byte_ids("héllo 你好 🙂")) == "héllo 你好 🙂"


@settings(max_examples=80, deadline=None)
@given(ids=st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=30), skip=st.booleans())
def test_stream_equals_full_decode_for_random_ids(ids: list[int], skip: bool) -> None:
    det = IncrementalDetokenizer(TOKENIZER, PROMPT, skip_special_tokens=skip)
    chunks = _stream(det, ids)
    assert "".join(chunks) == TOKENIZER.decode(ids, skip_special_tokens=skip)
    assert det.text == "".join(chunks)
    assert det.stop_hit is None


@settings(max_examples=80, deadline=None)
@given(sample=split_texts())
def test_split_characters_never_stream_replacement_chars(sample: tuple[str, list[int]]) -> None:
    text, ids = sample
    chunks = _stream(IncrementalDetokenizer(TOKENIZER, PROMPT), ids)
    assert "".join(chunks) == text
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_incomplete_character_is_held_until_completed() -> None:
    det = IncrementalDetokenizer(TOKENIZER, PROMPT)
    first, second, third, fourth = _byte_ids("🙂")
    assert [det.add(first), det.add(second), det.add(third)] == ["", "", ""]
    assert det.add(fourth) == "🙂"


def test_incomplete_character_at_end_is_flushed() -> None:
    ids = _encode("ok ") + _byte_ids("你")[:2]
    chunks = _stream(IncrementalDetokenizer(TOKENIZER, PROMPT), ids)
    assert chunks[-1].endswith("\ufffd")
    assert "".join(chunks) == TOKENIZER.decode(ids)


def test_prompt_ending_inside_a_character() -> None:
    head, tail = _byte_ids("é")
    prompt = _encode("ab") + [head]
    ids = [tail] + _encode("cd")
    chunks = _stream(IncrementalDetokenizer(TOKENIZER, prompt), ids)
    assert "".join(chunks) == TOKENIZER.decode(ids)


def test_skip_special_tokens_false_keeps_eos_text() -> None:
    ids = _encode("the cat") + [EOS_ID]
    det = IncrementalDetokenizer(TOKENIZER, PROMPT, skip_special_tokens=False)
    assert "".join(_stream(det, ids)) == "the cat" + EOS


def test_stop_string_spanning_several_tokens() -> None:
    ids = _byte_ids("the cat STOP the mat")
    det = IncrementalDetokenizer(TOKENIZER, PROMPT, stop=["STOP"])
    chunks = [det.add(token_id) for token_id in ids]
    assert "".join(chunks) == "the cat "
    assert det.stop_hit == "STOP"
    assert det.text == "the cat "
    assert det.flush() == ""
    assert det.add(_encode("x")[0]) == ""


def test_emitted_text_lags_by_longest_stop_minus_one() -> None:
    det = IncrementalDetokenizer(TOKENIZER, PROMPT, stop=["!", "cat!"])
    chunks = [det.add(token_id) for token_id in _byte_ids("a cat sat")]
    assert "".join(chunks) == "a cat "
    assert det.flush() == "sat"
    assert det.stop_hit is None


def test_first_completed_of_several_stop_strings_wins() -> None:
    det = IncrementalDetokenizer(TOKENIZER, PROMPT, stop=["mat", "你好", "sat"])
    chunks = _stream(det, _encode("the cat sat 你好 on the mat"))
    assert "".join(chunks) == "the cat "
    assert det.stop_hit == "sat"


def test_stop_completed_first_wins_within_one_token() -> None:
    ids = _encode("the héllo")
    assert TOKENIZER.decode(ids[-1:]) == " héllo"
    det = IncrementalDetokenizer(TOKENIZER, PROMPT, stop=["héllo", "é"])
    assert "".join(_stream(det, ids)) == "the h"
    assert det.stop_hit == "é"


def test_stop_found_in_text_completed_by_flush() -> None:
    det = IncrementalDetokenizer(TOKENIZER, PROMPT, stop=["ab"])
    chunks = _stream(det, _byte_ids("xab") + _byte_ids("你")[:1])
    assert "".join(chunks) == "x"
    assert det.stop_hit == "ab"


@settings(max_examples=100, deadline=None)
@given(sample=split_texts(), data=st.data())
def test_stream_stops_right_before_first_completed_stop_string(
    sample: tuple[str, list[int]], data: st.DataObject
) -> None:
    text, ids = sample
    start = data.draw(st.integers(0, len(text)))
    length = data.draw(st.integers(1, 6))
    stops = [text[start : start + length] or "你", data.draw(st.sampled_from(ALPHABET))]
    hits = [(i + len(s), i) for i, s in ((text.find(s), s) for s in stops) if i >= 0]
    expected = text[: min(hits)[1]] if hits else text
    det = IncrementalDetokenizer(TOKENIZER, PROMPT, stop=stops)
    chunks = _stream(det, ids)
    assert "".join(chunks) == expected
    assert det.text == expected
    assert (det.stop_hit is not None) == bool(hits)


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError):
        IncrementalDetokenizer(TOKENIZER, PROMPT, stop=[""])
