"""`splitserve bench` as a subprocess against a real cluster (gateway, prefill and decode workers, Redis):
two rates, a results file that already holds another label's run, and the plot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splitserve import bench, bench_plot
from splitserve.launcher import LocalCluster

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/0"
WORKER_OPTIONS = {"num_kv_blocks": 512, "dtype": "float32", "max_num_seqs": 32, "max_num_batched_tokens": 256,
                  "prefill_chunk_size": 256}
NUM_PROMPTS = 12
STATS = ["mean", "median", "std", "p50", "p90", "p99"]
SUMMARY_KEYS = ["completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
                "request_goodput", "output_throughput", "total_token_throughput"] + [
    f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el") for stat in STATS]


@pytest.fixture(scope="module")
def cluster(make_checkpoint: Any) -> Iterator[LocalCluster]:
    model = make_checkpoint("llama", max_position_embeddings=1024)
    with LocalCluster(model, prefill_workers=1, decode_workers=1, redis_url=REDIS_URL,
                      worker_options=WORKER_OPTIONS) as c:
        yield c


def splitserve_bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "splitserve.cli", "bench", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def result(cluster: LocalCluster, make_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two rates of 12 prompts each, into a results file that already holds a "colocated" run."""
    folder = tmp_path_factory.mktemp("bench")
    json_path, png_path = folder / "out.json", folder / "out.png"
    earlier = bench.BenchConfig(address="x", label="colocated", rates=[2.0], max_concurrency=None, burstiness=1.0,
                                seed=0, duration_s=None, request_timeout_s=60, percentiles=[50, 90, 99],
                                slos_ms={"ttft": 2000}, workload={"input_len": "16:48"})
    record = bench.RequestRecord(20, 2, success=True, output_len=2, ttft=0.05, itl=[0.01], e2e=0.06)
    bench_plot.save_runs(json_path, "colocated", [bench.run_entry(earlier, 2.0, [record], 1.0)])
    model = make_checkpoint("llama", max_position_embeddings=1024)
    out = splitserve_bench(
        "--address", cluster.address, "--model", str(model), "--label", "disaggregated", "--request-rate", "4,inf",
        "--num-prompts", str(NUM_PROMPTS), "--input-len-range", "16:48", "--output-len-range", "4:12",
        "--goodput", "ttft:2000", "tpot:500", "--seed", "1", "--json", str(json_path), "--plot", str(png_path))
    return {"out": out, "json": json.loads(json_path.read_text()), "png": png_path}


def test_bench_prints_a_table_per_rate_and_an_overview(result: dict[str, Any]) -> None:
    out = result["out"]
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Serving Benchmark Result") == 2 and "TTFT p99" in out.stdout
    assert "Traceback" not in out.stderr and f"{NUM_PROMPTS}/{NUM_PROMPTS}" in out.stderr  # the progress bar


def test_json_has_every_metric_with_sane_values(result: dict[str, Any]) -> None:
    runs = [r for r in result["json"]["runs"] if r["label"] == "disaggregated"]
    assert [r["request_rate"] for r in runs] == [4.0, "inf"]
    for run in runs:
        s = run["summary"]
        assert set(SUMMARY_KEYS) <= set(s) and all(s[k] is not None for k in SUMMARY_KEYS), s
        assert s["completed"] == NUM_PROMPTS and s["failed"] == 0
        assert all(s[k] > 0 for k in SUMMARY_KEYS if not k.startswith(("failed", "std")))
        duration = s["duration"]
        assert math.isclose(s["request_throughput"], s["completed"] / duration)
        assert math.isclose(s["output_throughput"], s["total_output_tokens"] / duration)
        assert math.isclose(s["total_token_throughput"],
                            (s["total_input_tokens"] + s["total_output_tokens"]) / duration)
        assert 0 <= s["request_goodput"] <= s["request_throughput"]
        assert s["mean_ttft_ms"] <= s["mean_e2el_ms"] and s["p50_ttft_ms"] <= s["p90_ttft_ms"] <= s["p99_ttft_ms"]
        check_requests(run["requests"], s)


def check_requests(requests: list[dict[str, Any]], s: dict[str, Any]) -> None:
    assert len(requests) == NUM_PROMPTS
    assert all(r["success"] and r["error"] == "" for r in requests)
    assert all(r["output_len"] == r["expected_output_len"] and 4 <= r["output_len"] <= 12 for r in requests)
    assert all(16 <= r["prompt_len"] <= 48 for r in requests)
    assert sum(r["prompt_len"] for r in requests) == s["total_input_tokens"]
    assert sum(r["output_len"] for r in requests) == s["total_output_tokens"]
    assert sum(len(r["itl"]) for r in requests) == sum(r["output_len"] - 1 for r in requests)
    for r in requests:
        assert 0 < r["ttft"] <= r["e2e"] and all(gap >= 0 for gap in r["itl"])
        assert (r["e2e"] - r["ttft"]) / (r["output_len"] - 1) > 0  # TPOT
        assert r["start"] + r["e2e"] <= s["duration"] + 1e-3


def test_results_file_keeps_the_other_label_and_the_plot_is_drawn(result: dict[str, Any]) -> None:
    assert result["json"]["schema"] == bench_plot.SCHEMA
    assert [r["label"] for r in result["json"]["runs"]] == ["colocated", "disaggregated", "disaggregated"]
    png = result["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_bad_flags_exit_2_with_one_line() -> None:
    out = splitserve_bench("--request-rate", "0", timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("splitserve: error: --request-rate") and out.stderr.count("\n") == 1, out.stderr
    out = splitserve_bench("--num-prompts", "many", timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("splitserve: error: argument --num-prompts")
    assert out.stderr.count("\n") == 1, out.stderr
