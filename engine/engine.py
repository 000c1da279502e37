"""The in-process engine: add_request / step / abort over scheduler + model runner, and generate()."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.model_runner import ModelRunner, PendingStep
from engine.models.loader import load_hf_config
from engine.models.registry import max_model_len, model_class
from engine.outputs import RequestOutput, StepTiming
from engine.request import Request, RequestStatus, SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from tokenization.detokenizer import IncrementalDetokenizer

log = structlog.get_logger(__name__)

Prompt = str | Sequence[int]


class Engine:
    """One model replica in this process. Not thread-safe: one caller drives ``step()``."""

    def __init__(self, config: EngineConfig, hf_config: Any = None, weights: Any = None, tokenizer: Any = None,
                 *, detokenize: bool = True) -> None:
        """``detokenize=False`` (workers, whose gateway makes the text): text only for requests with stop
        strings, which need it to stop; the others skip a tokenizer call per token."""
        if hf_config is None:
            if not config.model:
                raise ValueError("no model: set config.model to a checkpoint folder")
            hf_config = load_hf_config(config.model)
        model_class(hf_config)  # refuse unsupported architectures before allocating anything
        _refuse_unbuilt_features(config)
        self.config, self.hf_config = config, hf_config
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(config.model)
        self.detokenize = detokenize
        self.eos_token_ids = _eos_token_ids(hf_config, config.model)
        self.max_model_len = _max_len(config, hf_config)
        self.runner = ModelRunner(config, hf_config, weights, self.max_model_len)
        self.scheduler = Scheduler(
            BlockManager(self.runner.kv_cache.num_blocks, config.block_size),
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            prefill_chunk_size=config.prefill_chunk_size,
            max_model_len=self.max_model_len,
        )
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._kept: dict[str, Request] = {}  # keep_kv requests, until release_kv
        self._ids = itertools.count()
        self.step_timings: deque[StepTiming] = deque(maxlen=4096)  # the latest steps, for benchmarks and metrics
        self.async_scheduling = config.async_scheduling if config.async_scheduling is not None \
            else self.runner.device.type == "cuda"
        # queued, tokens not read yet; with the scheduler's num_finished when it was queued
        self._in_flight: tuple[SchedulerOutput, PendingStep, int] | None = None

    # -- requests -------------------------------------------------------------------------------
    def add_request(
        self, prompt: Prompt, sampling: SamplingParams | None = None, request_id: str | None = None,
        *, keep_kv: bool = False,
    ) -> str:
        """Queue a request. ``keep_kv`` (prefill workers): its blocks outlive it until ``release_kv``,
        and every step that computes part of it is reported by ``step()``, for ``export_kv``."""
        request = self._new_request(prompt, sampling, request_id, keep_kv)
        self.scheduler.add_request(request)
        self._track_text(request)
        return request.request_id

    def add_remote_request(
        self, prompt: Prompt, sampling: SamplingParams | None, request_id: str, num_remote_tokens: int
    ) -> list[int] | None:
        """Decode side of a handoff: allocate blocks for prompt tokens [0, num_remote_tokens) that a
        prefill worker will send. Returns the block ids to publish, or None when they did not fit
        (the request then computes its whole prompt here)."""
        request = self._new_request(prompt, sampling, request_id, False)
        accepted = self.scheduler.add_remote_request(request, num_remote_tokens)
        self._track_text(request)
        return list(request.block_ids) if accepted else None

    def import_kv(self, request_id: str, start: int, kv: Any) -> None:
        """Write received KV (``export_kv``'s layout) for tokens [start, ...) of a WAITING_FOR_KV request.
        Safe to call while a step runs: those blocks belong to no scheduled request."""
        request = self._request(request_id)
        self.runner.kv_cache.scatter(request.block_ids, start, kv)

    def kv_ready(self, request_id: str, num_tokens: int, first_token: int | None) -> list[RequestOutput]:
        """Every remote token arrived: schedule the request (outputs if the first token finished it)."""
        request = self._request(request_id)
        self.scheduler.kv_ready(request_id, num_tokens, first_token)
        return [self._output(request, first_token)] if first_token is not None else []

    def kv_failed(self, request_id: str) -> None:
        """The transfer failed: free the blocks and compute the prompt here instead."""
        self.scheduler.kv_failed(request_id)

    def export_kv(self, request_id: str, start: int, end: int) -> Any:
        """Copy of tokens [start, end) of a request's KV: [layers, 2, end - start, kv_heads, head_dim]."""
        request = self._request(request_id, finished_ok=True)
        return self.runner.kv_cache.gather(request.block_ids, start, end)

    def release_kv(self, request_id: str) -> bool:
        """Free the blocks a finished ``keep_kv`` request still holds."""
        self._kept.pop(request_id, None)
        return self.scheduler.release_kv(request_id)

    def _request(self, request_id: str, finished_ok: bool = False) -> Request:
        request = self.scheduler.get_request(request_id) or (self._kept.get(request_id) if finished_ok else None)
        if request is None:
            raise KeyError(f"no such request {request_id!r}")
        return request

    def _new_request(self, prompt: Prompt, sampling: SamplingParams | None, request_id: str | None,
                     keep_kv: bool) -> Request:
        sampling = sampling or SamplingParams()
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model folder has none")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        request = Request(request_id, self.tokenize(prompt), sampling, eos_token_ids=self.eos_token_ids,
                          keep_kv=keep_kv)
        if keep_kv:
            self._kept[request_id] = request
        return request

    def _track_text(self, request: Request) -> None:
        if self.tokenizer is not None and (self.detokenize or request.sampling.stop):
            self._detokenizers[request.request_id] = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, request.sampling.stop
            )

    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer: pass prompt token ids instead of text")
            token_ids = list(self.tokenizer.encode(prompt))
        else:
            token_ids = [int(t) for t in prompt]
        if not token_ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        vocab = self.runner.vocab_size  # not hf_config's: a transformers config attribute costs microseconds
        if not (0 <= min(token_ids) and max(token_ids) < vocab):
            bad = next(t for t in token_ids if not 0 <= t < vocab)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        return token_ids

    def abort_request(self, request_id: str) -> bool:
        """Abort in any state; its blocks (held ones too) are free when this returns."""
        self._detokenizers.pop(request_id, None)
        self._kept.pop(request_id, None)
        return self.scheduler.abort_request(request_id) is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return the requests that produced a token."""
        start = time.perf_counter()
        if self._in_flight is None:
            scheduled = self.scheduler.schedule()
            if scheduled.is_empty:
                return []
            self._in_flight = (scheduled, self.runner.launch(scheduled), self.scheduler.num_finished)
        scheduled, pending, finished_at_launch = self._in_flight
        self._in_flight = None
        if self.async_scheduling:  # queue the next decode step now, so the device never waits for this CPU
            ahead = self.scheduler.schedule_ahead(scheduled)
            if ahead is not None:
                self._in_flight = (ahead, self.runner.launch(ahead, after=pending), self.scheduler.num_finished)
        result = pending.wait()
        # a step run ahead may hold requests that ended (stop, abort) after it was queued: no output for those
        ended = None
        if scheduled.ahead and self.scheduler.num_finished != finished_at_launch:
            ended = [item.request.status.is_finished for item in scheduled.scheduled]
        finished = self.scheduler.update_from_output(scheduled, result.sampled_token_ids)
        outputs = self._outputs(scheduled, result.sampled_token_ids, ended, finished)
        self.step_timings.append(StepTiming(
            scheduled.num_seqs, scheduled.num_batched_tokens, result.cuda_graph,
            time.perf_counter() - start, self.runner.last_device_wait_s, scheduled.ahead,
        ))
        return outputs

    def _outputs(self, scheduled: SchedulerOutput, sampled: list[int | None], ended: list[bool] | None,
                 finished: list[Request]) -> list[RequestOutput]:
        """Requests that got a token (or compute KV to keep), except those ``ended`` before the step ran;
        ``finished``: the requests the step finished."""
        if scheduled.decode is not None and ended is None:
            return self._decode_outputs(scheduled.decode.requests, sampled, finished)  # type: ignore[arg-type]
        return [
            self._output(item.request, token)
            for item, token, gone in zip(scheduled.scheduled, sampled, ended or [False] * len(sampled), strict=True)
            if not gone and (token is not None or item.request.keep_kv)
        ]

    def _decode_outputs(self, requests: tuple[Request, ...], sampled: list[int], finished: list[Request]
                        ) -> list[RequestOutput]:
        """The steady decode path: every request got a token. The outputs of those still running without text
        are made straight from them (once per request per step: keep it lean); the others go through _output,
        in the step's order as always."""
        outputs = [RequestOutput(request, [token]) for request, token in zip(requests, sampled, strict=True)]
        done, texts = set(finished), self._detokenizers
        if done or texts:
            for i, request in enumerate(requests):
                if request in done or request.request_id in texts:
                    outputs[i] = self._output(request, sampled[i])
        return outputs

    def _output(self, req: Request, token: int | None) -> RequestOutput:
        detok = self._detokenizers.get(req.request_id) if self._detokenizers else None
        new_text = ""
        if detok is not None and token is not None:
            new_text = detok.add(token)
            if detok.stop_hit is not None:
                if not req.is_finished:
                    self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
                req.status = RequestStatus.FINISHED_STOPPED  # also when the stop came with the last allowed token
                req.stop_reason = detok.stop_hit
            if req.is_finished:
                if detok.stop_hit is None:
                    new_text += detok.flush()
                del self._detokenizers[req.request_id]
        return RequestOutput(req, [] if token is None else [token], detok.text if detok else "", new_text,
                             req.status.finish_reason)

    def generate(
        self, prompts: Prompt | Sequence[Prompt], sampling: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in the order of ``prompts``."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = list(sampling) if isinstance(sampling, Sequence) else [sampling or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for prompt, sp in zip(prompts, params, strict=True):
                ids.append(self.add_request(prompt, sp))
        except Exception:
            for request_id in ids:  # all or nothing: no half-submitted batch left queued
                self.abort_request(request_id)
            raise
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]


def init_inference(model: Any, config: Any = None, **overrides: Any) -> Engine:
    """DeepSpeed-style entry point: a checkpoint folder or a transformers model, and a config
    (EngineConfig, dict, or a JSON/YAML path; DeepSpeed key names accepted)."""
    if isinstance(model, (str, Path)):
        return Engine(EngineConfig.from_any(config, model=str(model), **overrides))
    if hasattr(model, "config") and hasattr(model, "state_dict"):
        cfg = EngineConfig.from_any(config, **overrides)
        return Engine(cfg, hf_config=model.config, weights=model.state_dict().items())
    raise TypeError(f"init_inference takes a checkpoint folder or a transformers model, not {type(model).__name__}")


def _refuse_unbuilt_features(config: EngineConfig) -> None:
    """Settings the config accepts (DeepSpeed compatibility) but this engine cannot honour yet."""
    unbuilt = {
        "tensor_parallel.tp_size > 1 (multi-rank workers)": config.tp_size > 1,
        "quant.enabled (INT8 weights)": config.quant.enabled,
    }
    asked = [name for name, on in unbuilt.items() if on]
    if asked:
        raise ValueError(f"not supported by this version of the engine yet: {', '.join(asked)}")


def _max_len(config: EngineConfig, hf_config: Any) -> int:
    limit = max_model_len(hf_config)
    if config.max_out_tokens is not None and config.max_out_tokens > limit:
        raise ValueError(f"max_out_tokens {config.max_out_tokens} exceeds the model's context of {limit} tokens")
    return config.max_out_tokens or limit


def _load_tokenizer(model_dir: str | None) -> Any:
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if not model_dir or not any((Path(model_dir) / f).is_file() for f in files):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _eos_token_ids(hf_config: Any, model_dir: str | None) -> frozenset[int]:
    eos = getattr(hf_config, "eos_token_id", None)
    gen = Path(model_dir or "") / "generation_config.json"
    if model_dir and gen.is_file():
        import json

        eos = json.loads(gen.read_text()).get("eos_token_id", eos)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
