"""`splitserve bench`: a load generator against a running gateway, measured as vLLM's `benchmark_serving` does.

    samples (synthetic ids | JSONL) ──▶ arrivals (Poisson at R req/s, or all at once) ──▶ ≤ N in flight
        ──GenerateStream──▶ gateway ──▶ one RequestRecord per request ──▶ summarize() ──▶ table, JSON, plot

Definitions (vLLM's; times measured on this client, from the moment a request is sent):
  TTFT  time to the first streamed token.
  ITL   every gap between consecutive tokens; a message carrying k tokens splits its gap evenly over them
        (the first message's extra tokens get 0), so a request has output_len - 1 gaps.
  TPOT  (e2e - ttft) / (output_len - 1), for requests with more than one output token.
  E2EL  end to end: until the stream's last message.
  Goodput  successful requests that meet every given SLO (ttft, tpot, e2el in ms; tpot counts as 0 for
        one-token outputs), per second of the run.
Failed requests are counted but enter no latency or throughput. The first half of this module is pure
(records in, numbers out; the unit tests' ground); the second half sends the requests and reads the flags.
Tables, the results file and the plot are in bench_plot.py. No torch here.

    splitserve bench --address 127.0.0.1:50051 --request-rate 1,2,4 --num-prompts 200 \
        --input-len-range 32:256 --output-len 64 --goodput ttft:500 tpot:50 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

SLO_NAMES = ("ttft", "tpot", "e2el")
METRICS = (("ttft", "TTFT", "Time to First Token"), ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
           ("itl", "ITL", "Inter-token Latency"), ("e2el", "E2EL", "End-to-end Latency"))
DEFAULT_VOCAB_SIZE = 500
Prompt = str | list[int]


# -- records and metrics (pure) ------------------------------------------------------------------
@dataclass
class RequestRecord:
    """One request as the client saw it. Times in seconds; ``start`` is its send time from the run's start.
    ``prompt_len`` is the gateway's count when it reports usage (text prompts), else the ids sent."""

    prompt_len: int
    expected_output_len: int
    success: bool = False
    output_len: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    start: float = 0.0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None unless it succeeded with more than one token."""
        if not self.success or self.output_len < 2 or self.e2e is None or self.ttft is None:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def stats_ms(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float | None]:
    """mean/median/std (population) and each percentile of ``values_s``, in ms, under vLLM's key names
    (``mean_ttft_ms``, ``p99_ttft_ms``, ...); all None when there are no values."""
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"] + [f"{p_key(p)}_{name}_ms" for p in percentiles]
    if not values_s:
        return dict.fromkeys(keys)
    mean = sum(values_s) / len(values_s)
    std = math.sqrt(sum((v - mean) ** 2 for v in values_s) / len(values_s))
    numbers = [mean, percentile(values_s, 50), std] + [percentile(values_s, p) for p in percentiles]
    return {k: v * 1000 for k, v in zip(keys, numbers, strict=True)}


def rate_text(rate: float | str) -> str:
    """A request rate as the CLI and the results file spell it: "2", "0.5", "inf"."""
    return "inf" if rate == "inf" or (isinstance(rate, float) and math.isinf(rate)) else f"{float(rate):g}"


def p_key(p: float) -> str:
    """99 -> "p99", 99.9 -> "p99.9"."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """Whether a successful request meets every SLO given (a one-token output has tpot 0)."""
    if not record.success:
        return False
    values = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2el": record.e2e}
    return all((value := values[name]) is not None and value * 1000 <= limit for name, limit in slos_ms.items())


def summarize(records: Sequence[RequestRecord], duration_s: float, percentiles: Sequence[float] = (50, 90, 99),
              slos_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """One run's numbers under vLLM's names. Throughputs are per second of ``duration_s``;
    ``request_goodput`` is None when no SLO is given."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    ok = [r for r in records if r.success]
    total_input, total_output = sum(r.prompt_len for r in ok), sum(r.output_len for r in ok)
    summary: dict[str, Any] = {
        "completed": len(ok), "failed": len(records) - len(ok), "duration": duration_s,
        "total_input_tokens": total_input, "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": sum(meets_slos(r, slos_ms) for r in ok) / duration_s if slos_ms else None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    samples = {"ttft": [r.ttft for r in ok if r.ttft is not None],
               "tpot": [t for t in (r.tpot for r in ok) if t is not None],
               "itl": [gap for r in ok for gap in r.itl],
               "e2el": [r.e2e for r in ok if r.e2e is not None]}
    for name, values in samples.items():
        summary.update(stats_ms(name, values, percentiles))
    return summary


# -- workload (pure) -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LengthSpec:
    """A token count drawn uniformly from [low, high] (both included); fixed when they are equal."""

    low: int
    high: int

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


def parse_length(flag: str, fixed: int | None, range_text: str | None, default: int) -> LengthSpec:
    """``--x-len N`` or ``--x-len-range A:B`` (at most one), else ``default``; ValueError names the flag."""
    if fixed is not None and range_text is not None:
        raise ValueError(f"give --{flag} or --{flag}-range, not both")
    if range_text is None:
        value = default if fixed is None else fixed
        if value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
        return LengthSpec(value, value)
    low, sep, high = range_text.partition(":")
    try:
        spec = LengthSpec(int(low), int(high))
    except ValueError:
        spec = None
    if not sep or spec is None or not 1 <= spec.low <= spec.high:
        raise ValueError(f"--{flag}-range must be MIN:MAX with 1 <= MIN <= MAX, got {range_text!r}")
    return spec


@dataclass(frozen=True)
class SampleRequest:
    """What to send: a prompt (text or token ids), its length when known here, and max_new_tokens."""

    prompt: Prompt
    prompt_len: int | None
    output_len: int


def synthetic_requests(num: int, input_len: LengthSpec, output_len: LengthSpec, vocab_size: int,
                       seed: int) -> list[SampleRequest]:
    """``num`` prompts of random token ids in [0, vocab_size), seeded: the same seed, the same prompts."""
    rng = random.Random(f"prompts-{seed}")
    out = []
    for _ in range(num):
        n = input_len.sample(rng)
        out.append(SampleRequest([rng.randrange(vocab_size) for _ in range(n)], n, output_len.sample(rng)))
    return out


def parse_dataset(lines: Iterable[str], source: str = "dataset") -> list[tuple[Prompt, int | None]]:
    """JSONL, one object a line: ``{"prompt": "..."}`` or ``{"prompt_token_ids": [...]}``, optional
    ``"output_len"``; blank lines are skipped. ValueError names the line and what is wrong with it."""
    entries: list[tuple[Prompt, int | None]] = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            entries.append(_dataset_entry(line, f"{source} line {number}"))
    if not entries:
        raise ValueError(f"{source} holds no prompts")
    return entries


def _dataset_entry(line: str, where: str) -> tuple[Prompt, int | None]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or ("prompt" in obj) == ("prompt_token_ids" in obj):
        raise ValueError(f'{where}: needs an object with exactly one of "prompt" or "prompt_token_ids"')
    prompt = obj.get("prompt", obj.get("prompt_token_ids"))
    if "prompt" in obj and not (isinstance(prompt, str) and prompt):
        raise ValueError(f'{where}: "prompt" must be a non-empty string')
    if "prompt_token_ids" in obj and not (
            isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt)):
        raise ValueError(f'{where}: "prompt_token_ids" must be a non-empty list of non-negative integers')
    assert isinstance(prompt, str | list)
    output_len = obj.get("output_len")
    if output_len is not None and (type(output_len) is not int or output_len < 1):
        raise ValueError(f'{where}: "output_len" must be a positive integer, got {output_len!r}')
    return prompt, output_len


def dataset_requests(entries: Sequence[tuple[Prompt, int | None]], num: int, output_len: LengthSpec,
                     seed: int) -> list[SampleRequest]:
    """``num`` requests from the entries in file order (cycling when ``num`` is larger); an entry without
    ``output_len`` draws one from ``output_len``."""
    rng = random.Random(f"outputs-{seed}")
    out = []
    for i in range(num):
        prompt, n = entries[i % len(entries)]
        length = None if isinstance(prompt, str) else len(prompt)
        out.append(SampleRequest(prompt, length, n if n is not None else output_len.sample(rng)))
    return out


def arrival_times(num: int, rate: float, seed: int, burstiness: float = 1.0) -> list[float]:
    """Send times (s from the start) of ``num`` requests: the first at 0, then gaps from a gamma distribution
    of mean 1/rate and shape ``burstiness`` (1 = exponential gaps: a Poisson process). inf: all at 0."""
    if not rate > 0 or not burstiness > 0:
        raise ValueError(f"rate and burstiness must be positive, got {rate} and {burstiness}")
    if math.isinf(rate):
        return [0.0] * num
    rng, t, out = random.Random(f"arrivals-{seed}"), 0.0, []
    for _ in range(num):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def parse_rates(text: str) -> list[float]:
    """"1,2,4" or "inf" -> rates in req/s, each positive."""
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(r > 0 for r in rates):
        raise ValueError(f"--request-rate must be positive numbers or inf, comma-separated, got {text!r}")
    return rates


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < p <= 100 for p in values):
        raise ValueError(f"--percentiles must be numbers in (0, 100], comma-separated, got {text!r}")
    return values


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (ms); names from SLO_NAMES."""
    slos: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition(":")
        try:
            limit = float(value)
        except ValueError:
            limit = -1.0
        if name not in SLO_NAMES or not limit >= 0:
            raise ValueError(f"--goodput takes NAME:MS pairs with NAME one of {', '.join(SLO_NAMES)} "
                             f"and MS >= 0, got {item!r}")
        slos[name] = limit
    return slos



# -- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """Everything a bench run needs, validated once from the flags."""

    address: str
    label: str
    rates: list[float]
    max_concurrency: int | None
    burstiness: float
    seed: int
    duration_s: float | None
    request_timeout_s: float
    percentiles: list[float]
    slos_ms: dict[str, float]
    workload: dict[str, Any]
    json_path: Path | None = None
    plot_path: Path | None = None
    progress: bool = True


def config_from_args(args: argparse.Namespace) -> tuple[BenchConfig, list[SampleRequest]]:
    """The flags -> (config, the requests to send at every rate); ValueError names the bad flag."""
    for flag, value, low in (("--num-prompts", args.num_prompts, 1), ("--max-concurrency", args.max_concurrency, 1),
                             ("--vocab-size", args.vocab_size, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--duration", args.duration), ("--request-timeout", args.request_timeout),
                        ("--burstiness", args.burstiness)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    output_len = parse_length("output-len", args.output_len, args.output_len_range, 32)
    samples, workload = _samples(args, output_len)
    config = BenchConfig(
        address=args.address, label=args.label, rates=parse_rates(args.request_rate),
        max_concurrency=args.max_concurrency, burstiness=args.burstiness, seed=args.seed, duration_s=args.duration,
        request_timeout_s=args.request_timeout, percentiles=parse_percentiles(args.percentiles),
        slos_ms=parse_goodput(args.goodput or ()), workload=workload,
        json_path=Path(args.json) if args.json else None, plot_path=Path(args.plot) if args.plot else None,
        progress=not args.no_progress,
    )
    return config, samples


def _samples(args: argparse.Namespace, output_len: LengthSpec) -> tuple[list[SampleRequest], dict[str, Any]]:
    model = _model_config(args.model)
    if args.dataset is None:
        input_len = parse_length("input-len", args.input_len, args.input_len_range, 128)
        vocab_size = args.vocab_size or model.get("vocab_size") or DEFAULT_VOCAB_SIZE
        samples = synthetic_requests(args.num_prompts or 100, input_len, output_len, vocab_size, args.seed)
        workload = {"input_len": str(input_len), "vocab_size": vocab_size}
    else:
        if args.input_len is not None or args.input_len_range is not None:
            raise ValueError("--input-len and --input-len-range do not apply with --dataset")
        path = Path(args.dataset)
        if not path.is_file():
            raise ValueError(f"--dataset: {path} is not a file")
        with path.open(encoding="utf-8") as lines:
            entries = parse_dataset(lines, str(path))
        samples = dataset_requests(entries, args.num_prompts or len(entries), output_len, args.seed)
        workload = {"dataset": str(path)}
    _check_context(samples, model.get("max_position_embeddings"))
    return samples, {**workload, "output_len": str(output_len), "num_prompts": len(samples)}


def _model_config(folder: str | None) -> dict[str, Any]:
    if folder is None:
        return {}
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--model: cannot read {path}: {e}") from None
    return config if isinstance(config, dict) else {}


def _check_context(samples: Sequence[SampleRequest], context: int | None) -> None:
    for sample in samples:
        if context and sample.prompt_len is not None and sample.prompt_len + sample.output_len > context:
            raise ValueError(f"a prompt of {sample.prompt_len} tokens plus {sample.output_len} new tokens exceeds "
                             f"the model's context of {context}")


# -- running -------------------------------------------------------------------------------------
class Progress:
    """A plain progress bar on stderr: redrawn in place on a terminal, a line per tenth elsewhere."""

    def __init__(self, total: int, title: str, enabled: bool = True) -> None:
        self.total, self.title, self.enabled = total, title, enabled and total > 0
        self.done = self.failed = 0
        self._start, self._tty = time.perf_counter(), sys.stderr.isatty()

    def update(self, ok: bool) -> None:
        self.done, self.failed = self.done + 1, self.failed + (not ok)
        if self.enabled and (self._tty or self.done == self.total or self.done % max(1, self.total // 10) == 0):
            filled = 30 * self.done // self.total
            line = (f"{self.title} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                    f"failed {self.failed} {time.perf_counter() - self._start:.1f}s")
            sys.stderr.write(f"\r{line}" if self._tty else f"{line}\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self._tty and self.done:
            sys.stderr.write("\n")
            sys.stderr.flush()


async def send(client: Any, sample: SampleRequest, t0: float, timeout_s: float | None = None) -> RequestRecord:
    """Streams one request and times every token; a failure is recorded, never raised."""
    import grpc.aio

    record = RequestRecord(prompt_len=sample.prompt_len or 0, expected_output_len=sample.output_len)
    sent = time.perf_counter()
    record.start, last = sent - t0, sent
    try:
        async for chunk in client.stream(sample.prompt, max_new_tokens=sample.output_len, ignore_eos=True,
                                         timeout=timeout_s):
            now, n = time.perf_counter(), len(chunk.token_ids)
            if n and record.output_len == 0:
                record.ttft = now - sent
                record.itl.extend([0.0] * (n - 1))
            elif n:
                record.itl.extend([(now - last) / n] * n)
            if n:
                record.output_len, last = record.output_len + n, now
            if chunk.usage and chunk.usage.get("prompt_tokens"):
                record.prompt_len = chunk.usage["prompt_tokens"]
        record.e2e = time.perf_counter() - sent
        record.success = record.output_len > 0
        record.error = "" if record.success else "the stream ended without a token"
    except grpc.RpcError as e:
        record.error = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e)
    return record


async def run_rate(config: BenchConfig, samples: Sequence[SampleRequest], rate: float,
                   progress: Progress | None = None) -> tuple[list[RequestRecord], float]:
    """Sends ``samples`` at ``rate`` (at most ``max_concurrency`` in flight; none sent after ``duration_s``);
    returns their records and the run's duration (s), from the first send to the last answer."""
    from splitserve.client import AsyncClient

    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    offsets = arrival_times(len(samples), rate, config.seed, config.burstiness)

    async def one(client: AsyncClient, sample: SampleRequest, t0: float) -> RequestRecord | None:
        if limit is not None:
            await limit.acquire()
        try:
            if config.duration_s is not None and time.perf_counter() - t0 >= config.duration_s:
                return None
            record = await send(client, sample, t0, config.request_timeout_s)
        finally:
            if limit is not None:
                limit.release()
        if progress is not None:
            progress.update(record.success)
        return record

    async with AsyncClient(config.address) as client:
        t0, tasks = time.perf_counter(), []
        for sample, offset in zip(samples, offsets, strict=True):
            if config.duration_s is not None and offset >= config.duration_s:
                break
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, sample, t0)))
        records = [r for r in await asyncio.gather(*tasks) if r is not None]
        return records, time.perf_counter() - t0


async def _first_request(config: BenchConfig, sample: SampleRequest) -> None:
    """vLLM's initial test run: one request must succeed before the benchmark starts."""
    from splitserve.client import AsyncClient

    async with AsyncClient(config.address) as client:
        record = await send(client, sample, 0.0, config.request_timeout_s)
    if not record.success:
        raise ConnectionError(f"the first request to the gateway at {config.address} failed: {record.error}")


async def _bench(config: BenchConfig, samples: list[SampleRequest]) -> list[dict[str, Any]]:
    from splitserve import bench_plot

    await _first_request(config, samples[0])
    runs: list[dict[str, Any]] = []
    for rate in config.rates:
        progress = Progress(len(samples), f"{config.label} @ {rate_text(rate)} req/s", config.progress)
        records, duration = await run_rate(config, samples, rate, progress)
        progress.close()
        runs.append(run_entry(config, rate, records, duration))
        print(bench_plot.format_table(runs[-1]), flush=True)
        if config.json_path is not None:
            bench_plot.save_runs(config.json_path, config.label, runs)
    return runs


def run_entry(config: BenchConfig, rate: float, records: Sequence[RequestRecord], duration: float) -> dict[str, Any]:
    """One rate's entry of the JSON file: the settings, the summary and every request."""
    return {
        "label": config.label, "request_rate": "inf" if math.isinf(rate) else rate,
        "max_concurrency": config.max_concurrency, "burstiness": config.burstiness, "seed": config.seed,
        "duration_cap_s": config.duration_s, "address": config.address, "workload": config.workload,
        "percentiles": config.percentiles, "goodput_slos_ms": config.slos_ms,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "summary": summarize(records, duration, config.percentiles, config.slos_ms),
        "requests": [_record_json(r) for r in records],
    }


def _record_json(record: RequestRecord) -> dict[str, Any]:
    out = asdict(record)
    out["itl"] = [round(gap, 7) for gap in record.itl]
    return out


# -- command line --------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `bench` flags. Parser errors print one line, `splitserve: error: ...`, and exit 2."""
    p.error = _parser_error  # type: ignore[method-assign]
    p.add_argument("--address", default="127.0.0.1:50051", help="the gateway, host:port (default: %(default)s)")
    p.add_argument("--label", default="default", help="names this run in the JSON file and the plot")
    g = p.add_argument_group("arrivals")
    g.add_argument("--request-rate", default="inf", metavar="R[,R...]",
                   help="requests/s, Poisson arrivals; comma-separated rates run in turn; inf = all at once")
    g.add_argument("--max-concurrency", type=int, metavar="N", help="most requests in flight (with or without a rate)")
    g.add_argument("--burstiness", type=float, default=1.0, metavar="B",
                   help="gamma shape of the gaps; 1 = Poisson (default)")
    g.add_argument("--num-prompts", type=int, metavar="N",
                   help="requests per rate (default: 100, or the dataset's lines)")
    g.add_argument("--seed", type=int, default=0, help="seeds prompts, lengths and arrivals (default: 0)")
    g.add_argument("--duration", type=float, metavar="S", help="send no request after this many seconds of a rate")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="deadline of each request in seconds (default: %(default)g)")
    w = p.add_argument_group("workload")
    w.add_argument("--input-len", type=int, metavar="N", help="prompt tokens (default: 128)")
    w.add_argument("--input-len-range", metavar="MIN:MAX", help="prompt tokens, uniform in [MIN, MAX]")
    w.add_argument("--output-len", type=int, metavar="N", help="new tokens, exact: ignore_eos is set (default: 32)")
    w.add_argument("--output-len-range", metavar="MIN:MAX", help="new tokens, uniform in [MIN, MAX]")
    w.add_argument("--dataset", metavar="FILE.jsonl",
                   help='lines {"prompt": "..."} or {"prompt_token_ids": [...]}, optional "output_len"')
    w.add_argument("--vocab-size", type=int, metavar="V", help=f"synthetic ids are < this (default: --model's, else "
                   f"{DEFAULT_VOCAB_SIZE})")
    w.add_argument("--model", metavar="DIR", help="checkpoint folder: its config.json gives the vocabulary and context")
    r = p.add_argument_group("results")
    r.add_argument("--percentiles", default="50,90,99", metavar="P[,P...]",
                   help="latency percentiles (default: %(default)s)")
    r.add_argument("--goodput", nargs="+", metavar="NAME:MS", help="SLOs: ttft, tpot, e2el in ms, e.g. ttft:500")
    r.add_argument("--json", metavar="FILE", help="write summaries and every request (kept: other labels' runs)")
    r.add_argument("--plot", metavar="FILE.png", help="latency percentiles and goodput versus rate (matplotlib)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _parser_error(message: str) -> NoReturn:
    print(f"splitserve: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run(args: argparse.Namespace) -> int:
    """`splitserve bench`: ValueError for bad flags (exit 2); 1 when the gateway cannot be used."""
    from splitserve import bench_plot

    config, samples = config_from_args(args)
    if config.plot_path is not None:
        bench_plot.require_matplotlib()
    if config.json_path is not None:
        bench_plot.load_runs(config.json_path)
    try:
        runs = asyncio.run(_bench(config, samples))
    except ConnectionError as e:
        print(f"splitserve: error: {e}", file=sys.stderr)
        return 1
    if len(runs) > 1:
        print(bench_plot.format_overview(runs))
    if config.plot_path is not None:
        everything = bench_plot.load_runs(config.json_path) if config.json_path is not None else runs
        bench_plot.plot(everything, config.plot_path)
        print(f"wrote {config.plot_path}", file=sys.stderr)
    return 0
