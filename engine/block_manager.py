"""The KV-cache block pool: which blocks are free, who holds them, and where each token's slot is (no torch)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from engine.request import Request


class BlockManager:
    """A pool of ``num_blocks`` fixed-size KV blocks, each holding ``block_size`` tokens.

    The pool is bookkeeping only; the KV tensors live in the kv cache, indexed by the slots
    computed here. A request owns the list ``request.block_ids`` (its block table); this class
    appends to it and clears it, and keeps one reference count per block so that a block can be
    shared by several requests (prefix sharing). A block is free exactly when its count is 0.

    Layout, ``block_size = 4``, a request with 10 tokens and ``block_ids = [7, 2, 5]``::

        token t            0  1  2  3 | 4  5  6  7 | 8  9  .  .
        block_ids[t // 4]  ---- 7 ----|---- 2 -----|---- 5 -----
        t % 4              0  1  2  3 | 0  1  2  3 | 0  1  2  3
        slot              28 29 30 31 | 8  9 10 11 |20 21 22 23

        slot(t) = block_ids[t // block_size] * block_size + t % block_size

    The pool, seen as ``num_blocks * block_size`` slots (the flat slot mapping of the cache)::

        block  0         1         2         ...   7
             [0 1 2 3][4 5 6 7][8 9 10 11] ... [28 29 30 31]
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._free_block_ids: deque[int] = deque(range(num_blocks))
        self._ref_counts: list[int] = [0] * num_blocks

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self._num_blocks - len(self._free_block_ids)

    def ref_count(self, block_id: int) -> int:
        """How many holders block ``block_id`` has (0: free)."""
        return self._ref_counts[block_id]

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self._block_size)

    def num_new_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """Blocks to append so that ``request.block_ids`` covers its computed tokens plus ``num_new_tokens``."""
        num_tokens = request.num_computed_tokens + num_new_tokens
        return max(0, self.blocks_needed(num_tokens) - len(request.block_ids))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.num_new_blocks_needed(request, num_new_tokens) <= len(self._free_block_ids)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Append blocks to ``request.block_ids`` for ``num_new_tokens`` more tokens.

        All or nothing: returns False and changes nothing when the pool has too few free blocks.
        """
        num_new_blocks = -(-(request.num_computed_tokens + num_new_tokens) // self._block_size) - len(request.block_ids)
        if num_new_blocks <= 0:  # the common decode step: the last block has room
            return True
        if num_new_blocks > len(self._free_block_ids):
            return False
        for _ in range(num_new_blocks):
            block_id = self._free_block_ids.popleft()
            self._ref_counts[block_id] = 1
            request.block_ids.append(block_id)
        return True

    def free(self, request: Request) -> None:
        """Drop the request's hold on its blocks and give it a new, empty ``block_ids`` list (a new
        list, not a cleared one: whoever mirrors the old list, e.g. the step-input builder, sees the change).

        Blocks go back in reverse order, so that a request's tail (the least likely to be shared)
        is reused first; a block shared with another request stays allocated.
        """
        for block_id in reversed(request.block_ids):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free_block_ids.append(block_id)
        request.block_ids = []

    def share(self, block_ids: Iterable[int]) -> list[int]:
        """Take one more hold on each of ``block_ids`` (all allocated) and return them as a new list.

        The caller puts the list into another request's ``block_ids``; ``free`` of either request
        then leaves the blocks to the other.
        """
        shared = list(block_ids)
        for block_id in shared:
            if not 0 <= block_id < self._num_blocks or self._ref_counts[block_id] == 0:
                raise ValueError(f"block {block_id} is not allocated and cannot be shared")
        for block_id in shared:
            self._ref_counts[block_id] += 1
        return shared

    def slot(self, request: Request, position: int) -> int:
        """The flat cache slot of token ``position`` of ``request`` (see the class docstring)."""
        if not 0 <= position < len(request.block_ids) * self._block_size:
            raise IndexError(
                f"token {position} of request {request.request_id!r} is outside its "
                f"{len(request.block_ids)} blocks of {self._block_size}"
            )
        block_id = request.block_ids[position // self._block_size]
        return block_id * self._block_size + position % self._block_size
