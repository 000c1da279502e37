"""Turns a request's growing output token ids into streamed text: UTF-8 safe, with stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Decodes one request's output a token at a time for streaming.

    Each ``add`` decodes only a short window (the prefix/read offsets of vLLM):

        token_ids:  [ prompt ...  | output ...                              ]
                            ^prefix_offset      ^read_offset            ^len
                            |-- prefix_text ----|-- new text --------------|

    ``new text`` is final once the window's text does not end in U+FFFD (an incomplete UTF-8
    sequence); until then it waits for more tokens. The last ``len(longest stop) - 1``
    characters are also held back, so text past a stop string is never emitted. Over a whole
    request, the chunks from ``add`` and ``flush`` join to ``decode(output ids)`` cut right
    before the stop string that is completed first (for byte-level tokenizers; SentencePiece
    ones keep the first token's leading space, as vLLM does). If the prompt ends inside a
    character the prompt is not used as context. Pass a tokenizer that does not clean up spaces.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._token_ids = list(prompt_token_ids)
        self._prefix_offset, self._read_offset = self._initial_offsets()
        self._text = ""
        self._num_emitted = 0
        self.stop_hit: str | None = None

    @property
    def text(self) -> str:
        """All text emitted so far: the concatenation of what ``add`` and ``flush`` returned."""
        return self._text[: self._num_emitted]

    def add(self, token_id: int) -> str:
        """Appends one output token and returns the newly final text ("" once a stop was hit)."""
        if self.stop_hit is not None:
            return ""
        self._token_ids.append(token_id)
        self._append(self._decode_window(final=False))
        return self._emit(final=False)

    def flush(self) -> str:
        """Returns all held-back text at the end of a request ("" if a stop was hit)."""
        if self.stop_hit is not None:
            return ""
        self._append(self._decode_window(final=True))
        return self._emit(final=True)

    def _initial_offsets(self) -> tuple[int, int]:
        read_offset = len(self._token_ids)
        prefix_offset = max(read_offset - _CONTEXT_TOKENS, 0)
        if self._decode(self._token_ids[prefix_offset:read_offset]).endswith(_REPLACEMENT):
            prefix_offset = read_offset
        return prefix_offset, read_offset

    def _decode_window(self, final: bool) -> str:
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._token_ids[self._prefix_offset :])
        if len(window_text) <= len(prefix_text):
            return ""
        if window_text.endswith(_REPLACEMENT) and not final:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        return window_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _append(self, new_text: str) -> None:
        if not new_text:
            return
        start = len(self._text)
        self._text += new_text
        hits = [(self._text.find(s, max(start - len(s) + 1, 0)), s) for s in self._stop]
        found = [(index + len(s), index, s) for index, s in hits if index >= 0]
        if found:
            _, index, self.stop_hit = min(found)
            self._text = self._text[:index]

    def _emit(self, final: bool) -> str:
        holdback = 0 if final or self.stop_hit is not None else self._holdback
        end = len(self._text) - holdback
        if end <= self._num_emitted:
            return ""
        chunk = self._text[self._num_emitted : end]
        self._num_emitted = end
        return chunk
