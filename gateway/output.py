"""One request's output as the client sees it: tokens in order, each once, their text, and when they came."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenization.detokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class Delta:
    """New output for the client: token ids and their text (the text may lag the ids, never splits a character)."""

    request_id: str
    token_ids: list[int]
    text: str


class Output:
    """Collects output tokens that arrive by index from several sources (the prefill response's first
    token, decode streams, a retried decode stream), in order and without duplicates.

        index:   0     1   2   3 ...
                 ^ from the prefill response or the decode stream, whichever comes first
    A token past a gap waits in ``_pending`` until the gap is filled. Once a stop string is hit or
    ``max_new_tokens`` are in, nothing more is accepted.
    """

    def __init__(
        self,
        request_id: str,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str],
        max_new_tokens: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = []
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self._detok = IncrementalDetokenizer(tokenizer, list(prompt_token_ids), stop)
        self._max_new_tokens = max_new_tokens
        self._pending: dict[int, int] = {}
        self._clock = clock

    @property
    def stopped(self) -> bool:
        """A stop string was hit."""
        return self._detok.stop_hit is not None

    @property
    def complete(self) -> bool:
        return self.stopped or len(self.token_ids) >= self._max_new_tokens

    @property
    def has_gap(self) -> bool:
        """Tokens arrived past one that has not (they wait in ``_pending``)."""
        return bool(self._pending)

    @property
    def text(self) -> str:
        return self._detok.text

    def offer(self, index: int, token_ids: Sequence[int]) -> Delta | None:
        """Tokens ``token_ids`` at output positions ``index, index + 1, ...``; returns what is new, if anything."""
        for i, token_id in enumerate(token_ids, start=index):
            if len(self.token_ids) <= i < self._max_new_tokens:
                self._pending.setdefault(i, token_id)
        new_ids: list[int] = []
        new_text: list[str] = []
        while not self.complete and len(self.token_ids) in self._pending:
            token_id = self._pending.pop(len(self.token_ids))
            self.token_ids.append(token_id)
            new_ids.append(token_id)
            new_text.append(self._detok.add(token_id))
        if not new_ids:
            return None
        if self.complete:
            self._pending.clear()
        now = self._clock()
        if self.first_token_s is None:
            self.first_token_s = now
        self.last_token_s = now
        return Delta(self.request_id, new_ids, "".join(new_text))

    def flush(self) -> str:
        """The text held back until the end (the tail of a possible stop string, an unfinished character)."""
        return self._detok.flush()
