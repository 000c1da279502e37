"""A step's input tensors, built with numpy in pinned host memory and sent to the device in one copy.

Every integer input of a step (token ids, positions, KV slots, the attention layout, the rows to sample
and the block tables) is packed into one int32 staging buffer::

    [ input_ids T | positions T | slots T | seq_lens B | query_start_loc B+1 | logits_indices S | tables B*W ]

and copied with one non-blocking host-to-device transfer; the device tensors are views of that copy.
For a CUDA-graph decode step ``pad_to`` pads the batch to the graph's size: padding tokens get slot -1
(the KV write skips them) and one key of block 0 to attend to, so their rows are computed and ignored.

Block tables are the costly part at large batches (B x W ids), so each scheduled request keeps a row of
a persistent numpy table that only receives its newly appended block ids. A request not scheduled in a
step gives its row back, and a row is rebuilt when the request's ``block_ids`` list is not the one it
mirrors (``BlockManager.free`` replaces the list), so preemption and reused request ids cannot leave
stale ids behind.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.request import Request
from engine.scheduler import ScheduledRequest


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the flat batch whose next token is sampled
    num_seqs: int  # real sequences (the first rows); the rest is padding
    graph_inputs: torch.Tensor | None = None  # with pad_to: [4, pad_to] view of ids | positions | slots | seq_lens


@dataclass
class _Row:
    index: int
    blocks: list[int]  # the request's block_ids list this row mirrors (freeing blocks replaces the list)
    synced: int  # how many of its ids are already copied into the row

    def sync(self, table: np.ndarray) -> int:
        """Copy the block ids appended since the last sync into the table; returns the request's block count."""
        num_blocks = len(self.blocks)
        if num_blocks > self.synced:
            table[self.index, self.synced:num_blocks] = self.blocks[self.synced:]
            self.synced = num_blocks
        return num_blocks


class InputBuilder:
    """Owns the pinned staging buffers, the device copy and the persistent block-table rows of one runner."""

    def __init__(self, max_num_seqs: int, max_num_tokens: int, max_blocks_per_seq: int, block_size: int,
                 device: torch.device) -> None:
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = device
        # up to max_num_seqs rows are live at once; rows of the previous step are kept until it is built
        self._table = np.zeros((2 * max_num_seqs, max_blocks_per_seq), dtype=np.int32)
        self._free_rows = list(range(2 * max_num_seqs))
        self._rows: dict[Request, _Row] = {}
        size = 3 * max_num_tokens + 3 * max_num_seqs + 1 + max_num_seqs * max_blocks_per_seq
        pin = device.type == "cuda"
        # two staging buffers, alternated: a step fills one while the other's copy may still be in flight
        self._staging = [torch.zeros(size, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._turn = 0
        self._arange = np.arange(max(max_num_tokens, max_num_seqs) + 1, dtype=np.int32)
        self._zeros = np.zeros(max_num_seqs, dtype=np.int32)
        self._order: list[_Row] = []  # the last build's rows, in its order
        self._row_indices = np.zeros(0, dtype=np.intp)
        self._starts = np.zeros(0, dtype=np.int32)

    def build(self, scheduled: tuple[ScheduledRequest, ...], pad_to: int | None = None, ahead: bool = False
              ) -> StepInputs:
        """Inputs for ``scheduled``; ``pad_to`` (decode steps only) pads to that many one-token sequences.
        ``ahead``: the previous build's requests, one token further, whose tokens the caller writes on the
        device (``SchedulerOutput.ahead``); their rows, positions and widths are updated, not rebuilt."""
        n = len(scheduled)
        if ahead and self._same_requests(scheduled):
            rows, width = self._advance()
            lens, starts = self._arange[1:2].repeat(n), self._starts + 1
            token_ids: list[int] | np.ndarray = self._zeros[:n]  # placeholders: the device fills them in
        else:
            rows, lens_list, starts_list, token_ids, width = self._collect(scheduled)
            lens, starts = np.array(lens_list, dtype=np.int32), np.array(starts_list, dtype=np.int32)
        self._starts = starts
        num_tokens = len(token_ids)
        b = n if pad_to is None else pad_to  # sequences, padding included
        t = num_tokens if pad_to is None else pad_to  # tokens, padding included
        if pad_to is not None and (pad_to < n or num_tokens != n):
            raise ValueError(f"pad_to={pad_to} needs a decode-only step of at most {pad_to} sequences")

        staging = self._staging[self._turn]
        self._turn ^= 1
        buf = staging.numpy()
        ids, pos, slots = buf[:t], buf[t:2 * t], buf[2 * t:3 * t]
        o = 3 * t
        seq_lens, qsl = buf[o:o + b], buf[o + b:o + 2 * b + 1]
        o += 2 * b + 1
        samples = [i for i, s in enumerate(scheduled) if s.samples]
        logits_idx = buf[o:o + len(samples)]
        o += len(samples)
        tables = buf[o:o + n * width].reshape(n, width)
        size = o + n * width

        ids[:num_tokens] = token_ids
        np.take(self._table[:, :width], rows, axis=0, out=tables)
        seq_lens[:n] = starts + lens
        if num_tokens == n:  # decode step: one token per sequence, at position starts[i]
            qsl[:n + 1] = self._arange[:n + 1]
            pos[:n] = starts
            seq_of_token = self._arange[:n]
        else:
            qsl[0] = 0
            np.cumsum(lens, out=qsl[1:n + 1])
            # position of flat token j of sequence i: starts[i] + (j - qsl[i])
            pos[:num_tokens] = self._arange[:num_tokens] + np.repeat(starts - qsl[:n], lens)
            seq_of_token = np.repeat(self._arange[:n], lens)
        bs = self.block_size
        p = pos[:num_tokens]
        slots[:num_tokens] = tables[seq_of_token, p // bs] * bs + p % bs
        logits_idx[:] = qsl[1:n + 1][samples] - 1 if len(samples) < n else qsl[1:n + 1] - 1
        if t > num_tokens:  # CUDA-graph padding: one token per padding sequence, never cached
            ids[num_tokens:] = 0
            pos[num_tokens:] = 0
            slots[num_tokens:] = -1
            seq_lens[n:] = 1
            qsl[n + 1:] = self._arange[n + 1:b + 1]

        dev = staging[:size].to(self.device, non_blocking=True)
        d_ids, d_pos, d_slots, d_seq_lens, d_qsl, d_logits, d_tables = dev.split(
            [t, t, t, b, b + 1, len(samples), n * width])
        metadata = AttentionMetadata(
            slot_mapping=d_slots,
            query_start_loc=d_qsl,
            seq_lens=d_seq_lens,
            block_tables=d_tables.view(n, width),
            max_query_len=int(lens.max()),
            max_seq_len=int(seq_lens[:n].max()),
        )
        packed = dev[:4 * b].view(4, b) if pad_to is not None else None
        return StepInputs(d_ids, d_pos, metadata, d_logits, n, packed)

    def _collect(self, scheduled: tuple[ScheduledRequest, ...]
                 ) -> tuple[np.ndarray, list[int], list[int], list[int], int]:
        """One pass over the step (it runs per request per step: keep it lean): each request's row of the
        persistent table with its new block ids copied in, its new token count, first position and token
        ids, and the widest block table of the step."""
        previous, current = self._rows, {}
        rows: list[int] = []
        lens: list[int] = []
        starts: list[int] = []
        token_ids: list[int] = []
        width = 1
        table = self._table
        for s in scheduled:
            request = s.request
            row = previous.pop(request, None)
            blocks = request.block_ids
            if row is None or row.blocks is not blocks:  # new here, or its blocks were freed and reallocated
                index = self._free_rows.pop() if row is None else row.index
                row = _Row(index, blocks, 0)
                table[index] = 0  # a reused row's old ids must not show past the new request's blocks
            num_blocks = row.sync(table)
            if num_blocks > width:
                width = num_blocks
            current[request] = row
            rows.append(row.index)
            start, num_new = s.start, s.num_new_tokens
            lens.append(num_new)
            starts.append(start)
            prompt = request.prompt_token_ids
            if num_new == 1:  # a decode: its last token, usually an output; not known yet in a step run ahead
                n_prompt = len(prompt)
                if start < n_prompt:
                    token_ids.append(prompt[start])
                else:
                    outputs = request.output_token_ids
                    token_ids.append(outputs[start - n_prompt] if start - n_prompt < len(outputs) else 0)
            else:
                token_ids.extend(request.token_slice(start, start + num_new))
        self._free_rows.extend(row.index for row in previous.values())
        self._rows = current
        self._order = list(current.values())
        self._row_indices = np.array(rows, dtype=np.intp)
        return self._row_indices, lens, starts, token_ids, width

    def _same_requests(self, scheduled: tuple[ScheduledRequest, ...]) -> bool:
        order = self._order
        return len(order) == len(scheduled) and all(
            row.blocks is s.request.block_ids for row, s in zip(order, scheduled, strict=True))

    def _advance(self) -> tuple[np.ndarray, int]:
        """The last build's rows with the blocks appended since copied in, and the new widest table."""
        table, width = self._table, 1
        for row in self._order:
            num_blocks = row.sync(table)
            if num_blocks > width:
                width = num_blocks
        return self._row_indices, width
