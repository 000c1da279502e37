"""What the engine hands back: a request's state after a step, and where a step's time went."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import Request


@dataclass(slots=True, init=False)
class RequestOutput:
    """A request's state after a step; ``new_*`` is what this step added (for streaming).

    ``token_ids`` (all output tokens so far) is a copy made when read: a step builds an output per
    running request, and copying every request's whole output each step would cost O(length) per token.
    """

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]
    text: str
    new_text: str
    finished: bool
    finish_reason: str | None
    num_preemptions: int
    num_computed_tokens: int
    num_output_tokens: int
    _output_ids: list[int] = field(repr=False)  # the request's list; only ever appended to

    def __init__(self, request: Request, new_token_ids: list[int], text: str = "", new_text: str = "",
                 finish_reason: str | None = None) -> None:
        """A snapshot of ``request`` now; ``finish_reason`` is its status's, None while it runs (the caller
        knows it: reading the status here would cost a third of the time in the common case of a running
        request, and this runs once per running request per step)."""
        self.request_id = request.request_id
        self.prompt_token_ids = request.prompt_token_ids
        self.new_token_ids = new_token_ids
        self.text = text
        self.new_text = new_text
        self.finish_reason = finish_reason
        self.finished = finish_reason is not None
        self.num_preemptions = request.num_preemptions
        self.num_computed_tokens = request.num_computed_tokens
        self._output_ids = outputs = request.output_token_ids
        self.num_output_tokens = len(outputs)

    @property
    def token_ids(self) -> list[int]:
        return self._output_ids[: self.num_output_tokens]


@dataclass(frozen=True)
class StepTiming:
    """Where one ``step()`` spent its time: ``host_s`` is the CPU's own work (scheduling, inputs,
    launches, outputs), ``device_wait_s`` the wait for the GPU's sampled tokens."""

    num_seqs: int
    num_tokens: int
    cuda_graph: bool
    wall_s: float
    device_wait_s: float
    ahead: bool = False  # queued while the step before ran (async scheduling)

    @property
    def decode_only(self) -> bool:
        return self.num_tokens == self.num_seqs

    @property
    def host_s(self) -> float:
        return self.wall_s - self.device_wait_s
