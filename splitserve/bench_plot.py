"""What `splitserve bench` reports: its tables, its results file (JSON) and its plot (matplotlib, imported lazily).

The results file holds every run so far, one entry per (label, request rate):

    {"schema": "splitserve-bench/1",
     "runs": [{"label", "request_rate" (number or "inf"), "max_concurrency", "burstiness", "seed",
               "duration_cap_s", "address", "workload", "percentiles", "goodput_slos_ms", "date",
               "summary": {vLLM's names: "completed", "failed", "duration", "request_throughput",
                           "request_goodput", "output_throughput", "total_token_throughput",
                           "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", ... (ttft tpot itl e2el)},
               "requests": [{"prompt_len", "expected_output_len", "success", "output_len",
                             "ttft", "itl": [...], "e2e", "start" (seconds), "error"}]}]}

Saving a label replaces that label's earlier runs and keeps every other label's, so that one plot can
compare runs made one after the other (say "disaggregated" and "colocated").
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splitserve.bench import METRICS, p_key, rate_text

SCHEMA = "splitserve-bench/1"


# -- tables --------------------------------------------------------------------------------------
def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(entry: dict[str, Any]) -> str:
    """One rate's result in vLLM's layout: 40-wide labels, then the value ("-": no samples)."""
    s = entry["summary"]
    rows = [("Label:", entry["label"]), ("Request rate (req/s):", rate_text(entry["request_rate"])),
            ("Max request concurrency:", entry["max_concurrency"] or "-"),
            ("Successful requests:", s["completed"]), ("Failed requests:", s["failed"]),
            ("Benchmark duration (s):", _number(s["duration"])), ("Total input tokens:", s["total_input_tokens"]),
            ("Total generated tokens:", s["total_output_tokens"]),
            ("Request throughput (req/s):", _number(s["request_throughput"]))]
    if s["request_goodput"] is not None:
        rows.append(("Goodput SLOs (ms):", " ".join(f"{k}:{v:g}" for k, v in entry["goodput_slos_ms"].items())))
        rows.append(("Request goodput (req/s):", _number(s["request_goodput"])))
    rows += [("Output token throughput (tok/s):", _number(s["output_throughput"])),
             ("Total token throughput (tok/s):", _number(s["total_token_throughput"]))]
    lines = ["{:=^50}".format(" Serving Benchmark Result ")] + [f"{k:<40} {v}" for k, v in rows]
    for name, short, header in METRICS:
        lines.append(f"{header:-^50}")
        lines.append(f"{f'Mean {short} (ms):':<40} {_number(s[f'mean_{name}_ms'])}")
        for p in entry["percentiles"]:
            lines.append(f"{f'P{p_key(p)[1:]} {short} (ms):':<40} {_number(s[f'{p_key(p)}_{name}_ms'])}")
    return "\n".join([*lines, "=" * 50])


def format_overview(runs: Sequence[dict[str, Any]]) -> str:
    """One line per rate: throughput, goodput and the median and top-percentile latencies (ms)."""
    top = p_key(max(runs[0]["percentiles"]))
    columns = ["rate", "ok", "failed", "req/s", "goodput", "out tok/s", "TTFT p50", f"TTFT {top}", "TPOT p50",
               f"TPOT {top}", "ITL p50", "E2EL p50"]
    lines = [" ".join(f"{c:>10}" for c in columns)]
    for entry in runs:
        s = entry["summary"]
        cells = [rate_text(entry["request_rate"]), s["completed"], s["failed"], _number(s["request_throughput"]),
                 _number(s["request_goodput"]), _number(s["output_throughput"]), _number(s["median_ttft_ms"]),
                 _number(s[f"{top}_ttft_ms"]), _number(s["median_tpot_ms"]), _number(s[f"{top}_tpot_ms"]),
                 _number(s["median_itl_ms"]), _number(s["median_e2el_ms"])]
        lines.append(" ".join(f"{c!s:>10}" for c in cells))
    return "\n".join(lines)


# -- the results file ----------------------------------------------------------------------------
def load_runs(path: Path) -> list[dict[str, Any]]:
    """The runs in ``path`` ([] when it does not exist); ValueError when it is not a results file."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--json: cannot read {path} as JSON: {e}") from None
    if not (isinstance(data, dict) and data.get("schema") == SCHEMA and isinstance(data.get("runs"), list)):
        raise ValueError(f"--json: {path} is not a splitserve bench results file (no \"schema\": \"{SCHEMA}\")")
    return data["runs"]


def save_runs(path: Path, label: str, runs: Sequence[dict[str, Any]]) -> None:
    """Writes ``runs`` (all of ``label``) with every other label's runs already in ``path``, atomically."""
    kept = [r for r in load_runs(path) if r.get("label") != label]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps({"schema": SCHEMA, "runs": [*kept, *runs]}, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


# -- the plot ------------------------------------------------------------------------------------
def require_matplotlib() -> Any:
    """matplotlib.pyplot on the Agg backend; ValueError saying how to install it when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'splitserve[bench]' (or matplotlib>=3.8)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _positions(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """x position of each rate: the rate itself; "inf" goes right of the largest finite rate."""
    finite = sorted({float(r["request_rate"]) for r in runs if r["request_rate"] != "inf"})
    positions = {rate_text(rate): rate for rate in finite}
    if any(r["request_rate"] == "inf" for r in runs):
        positions["inf"] = 2 * finite[-1] if finite else 1.0
    return positions


def _value(run: dict[str, Any], key: str) -> float:
    value = run["summary"].get(key)
    return math.nan if value is None else float(value)


def _top(run: dict[str, Any]) -> str:
    """The upper percentile to draw: p99 when the run has it, else its highest."""
    return "p99" if 99 in run["percentiles"] else p_key(max(run["percentiles"]))


def plot(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """TTFT and TPOT (p50 solid, p99 dashed) and goodput (solid; request throughput dotted) versus the
    request rate, one colour per label."""
    plt = require_matplotlib()
    positions = _positions(runs)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for i, label in enumerate(dict.fromkeys(r["label"] for r in runs)):
        mine = sorted((r for r in runs if r["label"] == label), key=lambda r: positions[rate_text(r["request_rate"])])
        x = [positions[rate_text(r["request_rate"])] for r in mine]
        top = _top(mine[0])
        for ax, name in zip(axes[:2], ("ttft", "tpot"), strict=True):
            ax.plot(x, [_value(r, f"median_{name}_ms") for r in mine], "o-", color=f"C{i}", label=f"{label} p50")
            ax.plot(x, [_value(r, f"{top}_{name}_ms") for r in mine], "s--", color=f"C{i}", label=f"{label} {top}")
        if any(r["summary"]["request_goodput"] is not None for r in mine):
            axes[2].plot(x, [_value(r, "request_goodput") for r in mine], "o-", color=f"C{i}", label=f"{label} goodput")
        axes[2].plot(x, [_value(r, "request_throughput") for r in mine], "^:", color=f"C{i}",
                     label=f"{label} throughput")
    titles = ("TTFT (ms)", "TPOT (ms)", "goodput and throughput (req/s)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("request rate (req/s)")
        ax.set_xticks(list(positions.values()), list(positions))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    slos = " ".join(f"{k}:{v:g}ms" for k, v in (runs[0].get("goodput_slos_ms") or {}).items())
    fig.suptitle(f"splitserve bench {' '.join(f'{k}={v}' for k, v in runs[0]['workload'].items())}"
                 + (f"  SLOs {slos}" if slos else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
