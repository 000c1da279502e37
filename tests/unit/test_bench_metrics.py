"""`splitserve bench` without a cluster: metrics on hand-made records, arrivals, lengths, JSONL, flags, files.

The expected numbers are worked out by hand from vLLM's definitions (see splitserve/bench.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from splitserve import bench, bench_plot, cli
from splitserve.bench import LengthSpec, RequestRecord, SampleRequest
from splitserve.client import StreamChunk

ROOT = Path(__file__).resolve().parents[2]


def ok(prompt_len: int, ttft: float, itl: list[float], e2e: float) -> RequestRecord:
    n = len(itl) + 1
    return RequestRecord(prompt_len, n, success=True, output_len=n, ttft=ttft, itl=itl, e2e=e2e)


def failed(prompt_len: int = 30) -> RequestRecord:
    return RequestRecord(prompt_len, 8, error="UNAVAILABLE: no decode worker")


# TPOT: (0.16 - 0.10) / 2 = 0.03; one token: none; (0.24 - 0.20) / 4 = 0.01.
RECORDS = [ok(10, 0.10, [0.02, 0.04], 0.16), ok(20, 0.30, [], 0.30), failed(), ok(5, 0.20, [0.01] * 4, 0.24)]


# -- metrics -------------------------------------------------------------------------------------
def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert bench.percentile(values, 50) == 2.5
    assert bench.percentile(values, 90) == pytest.approx(3.7)
    assert bench.percentile(values, 99) == pytest.approx(3.97)
    assert bench.percentile(values, 100) == 4.0 and bench.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_summary_counts_and_throughputs_exclude_failed_requests() -> None:
    s = bench.summarize(RECORDS, duration_s=2.0)
    assert (s["completed"], s["failed"], s["duration"]) == (3, 1, 2.0)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (35, 9)
    assert s["request_throughput"] == 1.5 and s["output_throughput"] == 4.5 and s["total_token_throughput"] == 22.0
    assert s["request_goodput"] is None


def test_summary_latencies() -> None:
    s = bench.summarize(RECORDS, duration_s=2.0, percentiles=[50, 90, 99])
    assert s["mean_ttft_ms"] == pytest.approx(200) and s["median_ttft_ms"] == pytest.approx(200)
    assert s["std_ttft_ms"] == pytest.approx(statistics.pstdev([100, 300, 200]))
    assert s["p90_ttft_ms"] == pytest.approx(280)
    assert s["mean_tpot_ms"] == pytest.approx(20) and s["p99_tpot_ms"] == pytest.approx(29.8)
    assert s["mean_itl_ms"] == pytest.approx(100 / 6) and s["median_itl_ms"] == pytest.approx(10)
    assert s["p99_itl_ms"] == pytest.approx(bench.percentile([0.02, 0.04] + [0.01] * 4, 99) * 1000)
    assert s["mean_e2el_ms"] == pytest.approx(700 / 3) and s["p50_e2el_ms"] == pytest.approx(240)


def test_tpot_is_defined_only_for_successes_with_two_tokens_or_more() -> None:
    assert RECORDS[0].tpot == pytest.approx(0.03) and RECORDS[3].tpot == pytest.approx(0.01)
    assert RECORDS[1].tpot is None and RECORDS[2].tpot is None


@pytest.mark.parametrize(("slos", "good"), [
    ({"ttft": 250}, 2),               # the 300 ms TTFT misses
    ({"ttft": 250, "tpot": 20}, 1),   # every SLO must hold: the 30 ms TPOT misses too
    ({"tpot": 5}, 1),                 # a one-token output counts as TPOT 0
    ({"e2el": 200}, 1),
    ({"ttft": 1000, "tpot": 1000, "e2el": 1000}, 3),  # the failed request never counts
    ({"ttft": 0}, 0),
])
def test_goodput_counts_requests_meeting_every_slo(slos: dict[str, float], good: int) -> None:
    assert bench.summarize(RECORDS, duration_s=2.0, slos_ms=slos)["request_goodput"] == good / 2.0


def test_all_failed_gives_zero_throughput_and_no_latencies() -> None:
    s = bench.summarize([failed(), failed()], duration_s=1.0, slos_ms={"ttft": 100})
    assert (s["completed"], s["failed"], s["request_throughput"], s["request_goodput"]) == (0, 2, 0.0, 0.0)
    assert s["total_input_tokens"] == 0 and s["output_throughput"] == 0.0
    assert all(s[f"{stat}_{m}_ms"] is None for stat in ("mean", "median", "std", "p99") for m in bench.SLO_NAMES)


def test_one_token_outputs_have_ttft_but_no_tpot_or_itl() -> None:
    s = bench.summarize([ok(3, 0.05, [], 0.05), ok(4, 0.07, [], 0.07)], duration_s=1.0)
    assert s["mean_ttft_ms"] == pytest.approx(60) and s["mean_e2el_ms"] == pytest.approx(60)
    assert s["mean_tpot_ms"] is None and s["p99_itl_ms"] is None and s["total_output_tokens"] == 2


def test_no_records_and_bad_duration() -> None:
    assert bench.summarize([], duration_s=1.0)["completed"] == 0
    with pytest.raises(ValueError, match="duration"):
        bench.summarize(RECORDS, duration_s=0.0)


def test_fractional_percentiles_get_vllm_keys() -> None:
    s = bench.summarize(RECORDS, duration_s=1.0, percentiles=[99.9])
    assert "p99.9_ttft_ms" in s and "p99_ttft_ms" not in s


# -- arrivals and workloads ----------------------------------------------------------------------
def test_poisson_arrivals_are_seeded_with_mean_gap_one_over_rate() -> None:
    times = bench.arrival_times(20000, rate=4.0, seed=3)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert times[0] == 0.0 and min(gaps) >= 0
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    assert bench.arrival_times(50, 4.0, seed=3) == times[:50]
    assert bench.arrival_times(50, 4.0, seed=4) != times[:50]


def test_bursty_arrivals_keep_the_rate_and_inf_sends_all_at_once() -> None:
    gaps = [b - a for a, b in zip(*(lambda t: (t, t[1:]))(bench.arrival_times(20000, 2.0, 0, 0.5)), strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.05)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(math.sqrt(2), rel=0.08)
    assert bench.arrival_times(5, math.inf, seed=0) == [0.0] * 5
    with pytest.raises(ValueError):
        bench.arrival_times(5, 0.0, seed=0)


def test_length_flags() -> None:
    assert bench.parse_length("input-len", None, None, 128) == LengthSpec(128, 128)
    assert bench.parse_length("input-len", 7, None, 128) == LengthSpec(7, 7)
    assert bench.parse_length("input-len", None, "32:256", 128) == LengthSpec(32, 256)
    assert str(LengthSpec(32, 256)) == "32:256" and str(LengthSpec(5, 5)) == "5"


@pytest.mark.parametrize(("fixed", "text", "says"), [
    (8, "1:2", "not both"), (0, None, "at least 1"), (None, "5", "MIN:MAX"), (None, "a:b", "MIN:MAX"),
    (None, "10:5", "MIN <= MAX"), (None, "0:5", "MIN:MAX"),
])
def test_bad_length_flags_name_the_flag(fixed: int | None, text: str | None, says: str) -> None:
    with pytest.raises(ValueError, match="--input-len") as e:
        bench.parse_length("input-len", fixed, text, 128)
    assert says in str(e.value)


def test_uniform_lengths_cover_the_range_and_fixed_ones_do_not_move() -> None:
    import random

    rng = random.Random(0)
    draws = {LengthSpec(3, 6).sample(rng) for _ in range(500)}
    assert draws == {3, 4, 5, 6}
    assert {LengthSpec(9, 9).sample(rng) for _ in range(20)} == {9}


def test_synthetic_prompts_are_seeded_random_ids_within_the_vocab() -> None:
    samples = bench.synthetic_requests(50, LengthSpec(4, 12), LengthSpec(2, 3), vocab_size=7, seed=1)
    assert len(samples) == 50
    assert all(4 <= len(s.prompt) <= 12 and s.prompt_len == len(s.prompt) for s in samples)
    assert all(0 <= t < 7 for s in samples for t in s.prompt) and {s.output_len for s in samples} == {2, 3}
    assert bench.synthetic_requests(50, LengthSpec(4, 12), LengthSpec(2, 3), 7, seed=1) == samples
    assert bench.synthetic_requests(50, LengthSpec(4, 12), LengthSpec(2, 3), 7, seed=2) != samples


# -- JSONL ---------------------------------------------------------------------------------------
def test_dataset_lines_of_both_kinds() -> None:
    lines = ['{"prompt": "hello there"}', "", '{"prompt_token_ids": [1, 2, 3], "output_len": 4}', "  \n"]
    entries = bench.parse_dataset(lines, "d.jsonl")
    assert entries == [("hello there", None), ([1, 2, 3], 4)]
    samples = bench.dataset_requests(entries, 5, LengthSpec(9, 9), seed=0)
    assert [s.prompt for s in samples] == ["hello there", [1, 2, 3]] * 2 + ["hello there"]
    assert [s.output_len for s in samples] == [9, 4, 9, 4, 9]
    assert [s.prompt_len for s in samples] == [None, 3, None, 3, None]


@pytest.mark.parametrize(("line", "says"), [
    ("{not json", "not valid JSON"),
    ('["a"]', 'exactly one of "prompt" or "prompt_token_ids"'),
    ('{"prompt": "a", "prompt_token_ids": [1]}', 'exactly one of "prompt" or "prompt_token_ids"'),
    ('{"text": "a"}', 'exactly one of "prompt" or "prompt_token_ids"'),
    ('{"prompt": ""}', '"prompt" must be a non-empty string'),
    ('{"prompt": 5}', '"prompt" must be a non-empty string'),
    ('{"prompt_token_ids": []}', "non-empty list of non-negative integers"),
    ('{"prompt_token_ids": [1, -2]}', "non-empty list of non-negative integers"),
    ('{"prompt_token_ids": [1, 2.5]}', "non-empty list of non-negative integers"),
    ('{"prompt_token_ids": [true]}', "non-empty list of non-negative integers"),
    ('{"prompt": "a", "output_len": 0}', '"output_len" must be a positive integer, got 0'),
    ('{"prompt": "a", "output_len": "5"}', '"output_len" must be a positive integer'),
])
def test_bad_dataset_lines_are_named(line: str, says: str) -> None:
    with pytest.raises(ValueError) as e:
        bench.parse_dataset(['{"prompt": "fine"}', "", line], "d.jsonl")
    assert str(e.value).startswith("d.jsonl line 3: ") and says in str(e.value)


def test_an_empty_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="d.jsonl holds no prompts"):
        bench.parse_dataset(["", "  "], "d.jsonl")


def test_rate_percentile_and_goodput_flags() -> None:
    assert bench.parse_rates("1,2.5,inf") == [1.0, 2.5, math.inf]
    assert bench.parse_percentiles("50,99.9") == [50.0, 99.9]
    assert bench.parse_goodput(["ttft:500", "tpot:50", "e2el:0"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 0.0}
    for bad in ("0", "-1", "x", "1,,2", ""):
        with pytest.raises(ValueError, match="--request-rate"):
            bench.parse_rates(bad)
    for bad in ("0", "101", "a"):
        with pytest.raises(ValueError, match="--percentiles"):
            bench.parse_percentiles(bad)
    for bad in ("ttft", "ttft:-1", "itl:5", "ttft:x", "TTFT:5"):
        with pytest.raises(ValueError, match="--goodput"):
            bench.parse_goodput([bad])


# -- one request, timed, against a fake client ---------------------------------------------------
class FakeClient:
    """Streams scripted messages: (seconds to wait, token ids); the last one carries usage."""

    def __init__(self, script: list[tuple[float, list[int]]], error: Exception | None = None) -> None:
        self.script, self.error, self.in_flight, self.most_in_flight = script, error, 0, 0

    async def stream(self, prompt: Any, **kwargs: Any) -> Any:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            for wait, ids in self.script:
                await asyncio.sleep(wait)
                yield StreamChunk(token_ids=ids, text="")
            if self.error is not None:
                raise self.error
            yield StreamChunk(token_ids=[], text="", finish_reason="length", usage={"prompt_tokens": 11})
        finally:
            self.in_flight -= 1

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None


def test_send_times_each_token_and_splits_a_message_of_several() -> None:
    client = FakeClient([(0.05, [1]), (0.02, [2]), (0.04, [3, 4])])
    record = asyncio.run(bench.send(client, SampleRequest("text", None, 4), t0=0.0))
    assert record.success and record.error == "" and record.output_len == 4 and record.prompt_len == 11
    assert 0.049 <= record.ttft < 0.5
    assert len(record.itl) == 3 and record.itl[1] == record.itl[2]  # 40 ms over two tokens
    assert 0.019 <= record.itl[0] < 0.5 and 0.019 <= record.itl[1] < 0.5
    assert record.e2e >= record.ttft + sum(record.itl) - 1e-6


def test_a_first_message_of_several_tokens_gives_zero_gaps() -> None:
    record = asyncio.run(bench.send(FakeClient([(0.0, [1, 2, 3])]), SampleRequest([1], 1, 3), t0=0.0))
    assert record.output_len == 3 and record.itl == [0.0, 0.0]


def test_send_records_failures_instead_of_raising() -> None:
    error = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                 details="no decode worker is alive")
    record = asyncio.run(bench.send(FakeClient([(0.0, [1])], error), SampleRequest([1], 1, 3), t0=0.0))
    assert not record.success and record.error == "UNAVAILABLE: no decode worker is alive"
    empty = asyncio.run(bench.send(FakeClient([]), SampleRequest([1], 1, 3), t0=0.0))
    assert not empty.success and "without a token" in empty.error


def config(**overrides: Any) -> bench.BenchConfig:
    base = dict(address="fake", label="t", rates=[math.inf], max_concurrency=None, burstiness=1.0, seed=0,
                duration_s=None, request_timeout_s=5.0, percentiles=[50.0, 99.0], slos_ms={}, workload={})
    return bench.BenchConfig(**{**base, **overrides})


def test_max_concurrency_bounds_requests_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeClient([(0.02, [1]), (0.02, [2])])
    monkeypatch.setattr("splitserve.client.AsyncClient", lambda address: client)
    samples = [SampleRequest([1], 1, 2)] * 12
    records, duration = asyncio.run(bench.run_rate(config(max_concurrency=3), samples, math.inf))
    assert len(records) == 12 and all(r.success for r in records) and client.most_in_flight == 3
    assert duration >= 4 * 0.04 * 0.9


def test_duration_cap_stops_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeClient([(0.0, [1])])
    monkeypatch.setattr("splitserve.client.AsyncClient", lambda address: client)
    samples = [SampleRequest([1], 1, 1)] * 200
    records, duration = asyncio.run(bench.run_rate(config(duration_s=0.3), samples, rate=20.0))
    assert 1 <= len(records) < 200 and max(r.start for r in records) < 0.3 + 0.05 and duration < 1.0


# -- files, tables, the command line -------------------------------------------------------------
def entry(label: str, rate: float | str, slos: dict[str, float] | None = None) -> dict[str, Any]:
    cfg = config(label=label, slos_ms=slos or {}, workload={"input_len": "8"})
    return bench.run_entry(cfg, math.inf if rate == "inf" else float(rate), RECORDS, 2.0)


def test_results_file_keeps_other_labels_and_replaces_its_own(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    bench_plot.save_runs(path, "a", [entry("a", 1), entry("a", 2)])
    bench_plot.save_runs(path, "b", [entry("b", 1)])
    bench_plot.save_runs(path, "a", [entry("a", "inf")])
    runs = bench_plot.load_runs(path)
    assert [(r["label"], r["request_rate"]) for r in runs] == [("b", 1.0), ("a", "inf")]
    assert runs[1]["requests"][2]["error"].startswith("UNAVAILABLE") and len(runs[1]["requests"]) == 4
    (tmp_path / "other.json").write_text('{"results": []}')
    with pytest.raises(ValueError, match="not a splitserve bench results file"):
        bench_plot.load_runs(tmp_path / "other.json")


def rows(table: str) -> dict[str, str]:
    return {line[:40].strip(): line[41:] for line in table.splitlines() if len(line) > 41 and line[40] == " "}


def test_table_and_overview() -> None:
    table = rows(bench_plot.format_table(entry("x", 2, {"ttft": 250})))
    assert table["Successful requests:"] == "3" and table["Failed requests:"] == "1"
    assert table["Goodput SLOs (ms):"] == "ttft:250" and table["Request goodput (req/s):"] == "1.00"
    assert table["Request throughput (req/s):"] == "1.50" and table["P99 TPOT (ms):"] == "29.80"
    assert table["Mean TTFT (ms):"] == "200.00" and table["Request rate (req/s):"] == "2"
    assert rows(bench_plot.format_table(bench.run_entry(config(), 1.0, [failed()], 1.0)))["Mean TPOT (ms):"] == "-"
    overview = bench_plot.format_overview([entry("x", 1), entry("x", "inf")])
    assert len(overview.splitlines()) == 3 and "TTFT p99" in overview and overview.splitlines()[2].split()[0] == "inf"


def test_plot_draws_every_label(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = [entry("disaggregated", r, {"ttft": 250}) for r in (1, 2, "inf")] + [entry("colocated", r) for r in (1, 2)]
    bench_plot.plot(runs, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "p.png").stat().st_size > 20000


def test_plot_without_matplotlib_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ValueError, match=r"--plot needs matplotlib: pip install 'splitserve\[bench\]'"):
        bench_plot.require_matplotlib()


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"vocab_size": 64, "max_position_embeddings": 64}))
    return tmp_path / "model"


BAD_FLAGS = {
    "rate zero": (["--request-rate", "0"], "--request-rate must be positive"),
    "rate text": (["--request-rate", "fast"], "--request-rate"),
    "not an int": (["--num-prompts", "x"], "argument --num-prompts: invalid int value"),
    "no prompts": (["--num-prompts", "0"], "--num-prompts must be at least 1"),
    "concurrency": (["--max-concurrency", "0"], "--max-concurrency must be at least 1"),
    "duration": (["--duration", "-1"], "--duration must be positive"),
    "goodput": (["--goodput", "itl:5"], "--goodput takes NAME:MS"),
    "percentiles": (["--percentiles", "0,50"], "--percentiles"),
    "range": (["--input-len-range", "5"], "--input-len-range must be MIN:MAX"),
    "both lengths": (["--output-len", "4", "--output-len-range", "1:2"], "--output-len or --output-len-range"),
    "no dataset": (["--dataset", "/nonexistent/d.jsonl"], "--dataset: /nonexistent/d.jsonl is not a file"),
    "unknown flag": (["--rate", "1"], "unrecognized arguments: --rate 1"),
    "no model": (["--model", "/nonexistent"], "--model: cannot read /nonexistent/config.json"),
}


def run_cli(argv: list[str], capsys: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, str]:
    monkeypatch.setattr(cli, "configure_logging", lambda *a: None)
    try:
        rc = cli.main(["bench", "--address", "127.0.0.1:1", *argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_exit_2_with_one_line(case: str, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    argv, says = BAD_FLAGS[case]
    rc, err = run_cli(argv, capsys, monkeypatch)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and len(errors) == 1 and errors[0].startswith("splitserve: error: ") and says in errors[0], err
    assert "Traceback" not in err


def test_refusals_that_need_files(tmp_path: Path, small_model: Path, capsys: Any, monkeypatch: Any) -> None:
    (tmp_path / "d.jsonl").write_text('{"prompt": "a"}\n{"prompt_token_ids": "x"}\n')
    (tmp_path / "other.json").write_text("[]")
    cases = [
        (["--dataset", str(tmp_path / "d.jsonl")], "d.jsonl line 2: "),
        (["--dataset", str(tmp_path / "d.jsonl"), "--input-len", "4"], "do not apply with --dataset"),
        (["--model", str(small_model), "--input-len", "60", "--output-len", "10"], "exceeds the model's context of 64"),
        (["--json", str(tmp_path / "other.json")], "is not a splitserve bench results file"),
    ]
    for argv, says in cases:
        rc, err = run_cli(argv, capsys, monkeypatch)
        assert rc == 2 and err.startswith("splitserve: error: ") and err.count("\n") == 1 and says in err, err


def test_an_unreachable_gateway_exits_1(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    rc, err = run_cli(["--num-prompts", "2", "--input-len", "4", "--output-len", "2"], capsys, monkeypatch)
    assert rc == 1 and err.startswith("splitserve: error: the first request to the gateway at 127.0.0.1:1 failed: ")
    assert "UNAVAILABLE" in err and err.count("\n") == 1


def test_the_vocabulary_comes_from_the_model(small_model: Path) -> None:
    argv = ["bench", "--model", str(small_model), "--input-len", "40", "--output-len", "8", "--seed", "3"]
    args = cli.build_parser().parse_args(argv)
    cfg, samples = bench.config_from_args(args)
    assert cfg.workload["vocab_size"] == 64 and max(t for s in samples for t in s.prompt) < 64
    assert len(samples) == 100 and cfg.rates == [math.inf] and cfg.slos_ms == {}


def test_bench_imports_no_torch() -> None:
    code = ("import sys, splitserve.bench, splitserve.bench_plot, splitserve.cli; splitserve.cli.build_parser(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
