"""A step's input tensors, built with numpy in pinned host memory and sent to the device in one copy.

Every integer input of a step (token ids, positions, KV slots, the attention layout, the rows to sample
and the block tables) is packed into one int32 staging buffer::

    [ input_ids T | positions T | slots T | seq_lens B | query_start_loc B+1 | logits_indices S | tables B*W ]

and copied with one non-blocking host-to-device transfer; the device tensors are views of that copy.
There are two staging buffers (and on a GPU two device buffers), used in turn: a step's inputs stay intact
while the next step is built, and a buffer is refilled only after the step that used it two builds ago
(queued before, on the same stream) read it. The views of a buffer are kept while its layout (the step's
sizes) repeats, as it does from one decode step to the next.
For a CUDA-graph decode step ``pad_to`` pads the batch to the graph's size: padding tokens get slot -1
(the KV write skips them) and one key of block 0 to attend to, so their rows are computed and ignored.
For a CUDA-graph prompt-chunk step ``pad_tokens`` pads the tokens to the graph's size: the padding tokens
form one extra sequence of their own (slot -1, no context, its block-table row all block 0), so no real
query attends to them and their rows are computed and ignored.

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
from engine.scheduler import DecodeBatch, DecodeGroup, ScheduledRequest


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the flat batch whose next token is sampled
    num_seqs: int  # real sequences (the first rows); the rest is padding
    # with pad_to: [4, pad_to] view of ids | positions | slots | seq_lens; with pad_tokens: [3, pad_tokens] view of
    # ids | positions | slots, and graph_seq_meta the [2B + 1] view of seq_lens | query_start_loc
    graph_inputs: torch.Tensor | None = None
    graph_seq_meta: torch.Tensor | None = None


class _Layout:
    """The views of one staging buffer (and its device copy) for one step shape: made once, reused while
    consecutive steps keep that shape."""

    def __init__(self, staging: torch.Tensor, device_buffer: torch.Tensor, key: tuple[int, int, int, int, int, str]
                 ) -> None:
        t, b, n, num_samples, width, padding = key
        self.key = key
        sizes = [t, t, t, b, b + 1, num_samples, n * width]
        size = sum(sizes)
        host = np.split(staging.numpy()[:size], np.cumsum(sizes)[:-1])
        self.ids, self.pos, self.slots, self.seq_lens, self.qsl, self.logits_idx, tables = host
        self.tables = tables.reshape(n, width)
        # on the CPU the staging buffer is the device buffer: nothing to copy
        self._copy = None if device_buffer is staging else (device_buffer[:size], staging[:size])
        dev = device_buffer[:size].split(sizes)
        self.d_ids, self.d_pos, self.d_slots, self.d_seq_lens, self.d_qsl, self.d_logits = dev[:6]
        self.d_tables = dev[6].view(n, width)
        self.d_packed = self.d_seq_meta = None
        if padding == "sequences":  # a decode graph's step: t == b
            self.d_packed = device_buffer[:4 * b].view(4, b)
        elif padding == "tokens":
            self.d_packed = device_buffer[:3 * t].view(3, t)
            self.d_seq_meta = device_buffer[3 * t:3 * t + 2 * b + 1]

    def send(self) -> None:
        if self._copy is not None:
            device, host = self._copy
            device.copy_(host, non_blocking=True)


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
        cuda = device.type == "cuda"
        # two staging buffers, alternated: a step fills one while the other's copy may still be in flight
        self._staging = [torch.zeros(size, dtype=torch.int32, pin_memory=cuda) for _ in range(2)]
        self._device_buffers = [torch.zeros(size, dtype=torch.int32, device=device) if cuda else staging
                                for staging in self._staging]
        self._layouts: list[_Layout | None] = [None, None]  # each buffer's views for the last shape it held
        self._turn = 0
        self._arange = np.arange(max(max_num_tokens, max_num_seqs) + 1, dtype=np.int32)
        self._zeros = np.zeros(max_num_seqs, dtype=np.int32)
        self._ones = np.ones(max_num_seqs, dtype=np.int32)
        self._order: list[_Row] = []  # the last build's rows, in its order
        self._row_indices = np.zeros(0, dtype=np.intp)
        self._width = 1  # the last build's widest block table
        self._decode: tuple[DecodeGroup, int] | None = None  # the last build's decode batch (group, step), if any

    def build(self, scheduled: tuple[ScheduledRequest, ...], pad_to: int | None = None,
              pad_tokens: int | None = None) -> StepInputs:
        """Inputs for ``scheduled``; ``pad_to`` (decode steps only) pads to that many one-token sequences,
        ``pad_tokens`` to that many tokens, the padding as one more sequence."""
        rows, lens, starts, token_ids, samples = self._collect(scheduled)
        return self._pack(rows, np.array(lens, dtype=np.int32), np.array(starts, dtype=np.int32), token_ids,
                          samples, pad_to, pad_tokens)

    def build_ahead(self, batch: DecodeBatch, pad_to: int | None = None) -> StepInputs:
        """Inputs for a decode step scheduled ahead (``SchedulerOutput.decode``) whose token ids the caller
        writes on the device (zeros here). The last build's requests, one token further, keep their rows:
        only those that got blocks since are copied in, and positions come from ``batch.starts``."""
        n = len(batch.requests)
        if self._decode == (batch.group, batch.step - 1):  # the batch right before: only its grown rows changed
            grown: range | tuple[int, ...] = batch.grown
        elif self._same_requests(batch.requests):
            grown = range(n)
        else:
            return self.build(batch.as_scheduled(), pad_to)
        self._sync_rows(grown)
        self._decode = (batch.group, batch.step)
        return self._pack(self._row_indices, self._ones[:n], batch.starts, self._zeros[:n], None, pad_to)

    def _pack(self, rows: np.ndarray, lens: np.ndarray, starts: np.ndarray, token_ids: list[int] | np.ndarray,
              samples: list[int] | None, pad_to: int | None, pad_tokens: int | None = None) -> StepInputs:
        """Fill a staging buffer (``samples``: the rows that sample, None for all) and send it to the device."""
        n, width = len(rows), self._width
        num_tokens = len(token_ids)
        b, t, padding = n, num_tokens, ""  # sequences and tokens, padding included
        if pad_to is not None:
            if pad_to < n or num_tokens != n or pad_tokens is not None:
                raise ValueError(f"pad_to={pad_to} needs a decode-only step of at most {pad_to} sequences")
            b, t, padding = pad_to, pad_to, "sequences"
        elif pad_tokens is not None:
            if pad_tokens < num_tokens:
                raise ValueError(f"pad_tokens={pad_tokens} is fewer than the step's {num_tokens} tokens")
            b, t, padding = n + 1, pad_tokens, "tokens"
        num_samples = n if samples is None else len(samples)

        layout = self._layout((t, b, n, num_samples, width, padding))
        ids, pos, slots, seq_lens, qsl, tables = \
            layout.ids, layout.pos, layout.slots, layout.seq_lens, layout.qsl, layout.tables
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
        layout.logits_idx[:] = qsl[1:n + 1] - 1 if samples is None else qsl[1:n + 1][samples] - 1
        if padding:  # CUDA-graph padding tokens: never cached, and no real query attends to them
            ids[num_tokens:] = 0
            pos[num_tokens:] = 0
            slots[num_tokens:] = -1
            if padding == "sequences":  # one token per padding sequence
                seq_lens[n:] = 1
                qsl[n + 1:] = self._arange[n + 1:b + 1]
            else:  # all of them one sequence: causal over themselves (block 0 in the graph's zeroed table row)
                seq_lens[n] = t - num_tokens
                qsl[n + 1] = t

        layout.send()
        metadata = AttentionMetadata(
            slot_mapping=layout.d_slots,
            query_start_loc=layout.d_qsl,
            seq_lens=layout.d_seq_lens,
            block_tables=layout.d_tables,
            max_query_len=1 if num_tokens == n else int(lens.max()),
            max_seq_len=int(seq_lens[:n].max()),
        )
        return StepInputs(layout.d_ids, layout.d_pos, metadata, layout.d_logits, n, layout.d_packed, layout.d_seq_meta)

    def _layout(self, key: tuple[int, int, int, int, int, str]) -> _Layout:
        """The next staging buffer's views for a step of this shape (made anew only when the shape changed)."""
        turn = self._turn
        self._turn ^= 1
        layout = self._layouts[turn]
        if layout is None or layout.key != key:
            layout = self._layouts[turn] = _Layout(self._staging[turn], self._device_buffers[turn], key)
        return layout

    def _collect(self, scheduled: tuple[ScheduledRequest, ...]
                 ) -> tuple[np.ndarray, list[int], list[int], list[int], list[int] | None]:
        """One pass over the step (it runs per request per step: keep it lean): each request's row of the
        persistent table with its new block ids copied in, its new token count, first position and token
        ids, the rows that sample (None for all), and the widest block table of the step."""
        previous, current = self._rows, {}
        rows: list[int] = []
        lens: list[int] = []
        starts: list[int] = []
        token_ids: list[int] = []
        samples: list[int] = []
        width = 1
        table = self._table
        for i, s in enumerate(scheduled):
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
            if s.samples:
                samples.append(i)
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
        self._width = width
        self._decode = None
        return self._row_indices, lens, starts, token_ids, None if len(samples) == len(rows) else samples

    def _same_requests(self, requests: tuple[Request, ...]) -> bool:
        order = self._order
        return len(order) == len(requests) and all(
            row.blocks is request.block_ids for row, request in zip(order, requests, strict=True))

    def _sync_rows(self, indices: range | tuple[int, ...]) -> None:
        """Copy the block ids appended since into these rows of the last build; widen the tables if needed."""
        table, order, width = self._table, self._order, self._width
        for i in indices:
            num_blocks = order[i].sync(table)
            if num_blocks > width:
                width = num_blocks
        self._width = width
