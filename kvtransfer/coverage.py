"""Coverage: which tokens of a transfer have been sent or written, so both sides know when it is whole."""

from __future__ import annotations


class Coverage:
    """Tokens ``[0, num_tokens)``, each seen or not; a range seen twice counts once."""

    def __init__(self, num_tokens: int) -> None:
        self._seen = bytearray(num_tokens)
        self.num_tokens = num_tokens
        self.num_seen = 0

    def in_range(self, start: int, n: int) -> bool:
        return 0 <= start and 0 <= n and start + n <= self.num_tokens

    def add(self, start: int, n: int) -> None:
        if not self.in_range(start, n):
            raise ValueError(f"tokens [{start}, {start + n}) are outside [0, {self.num_tokens})")
        self.num_seen += n - self._seen.count(1, start, start + n)
        self._seen[start : start + n] = b"\x01" * n

    @property
    def complete(self) -> bool:
        return self.num_seen == self.num_tokens

    def first_gap(self) -> tuple[int, int] | None:
        """The first unseen range ``(start, end)``, or None when complete."""
        start = self._seen.find(0)
        if start < 0:
            return None
        end = self._seen.find(1, start)
        return start, self.num_tokens if end < 0 else end
