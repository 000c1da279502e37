"""KV transfer throughput over loopback TCP: a decode process receives, this process sends.

    python bench/kv_transfer.py [--sizes-mib 1,4,16,64] [--repeats 5] [--chunk-mib 0] [--json out.json]

Each transfer is one request: ``send`` of the whole payload (or of ``--chunk-mib`` pieces), then
``finish``, timed on the sender from the first byte to the receiver's acknowledgement. The
receiver copies each chunk into a preallocated tensor, as the decode worker's scatter would.
Throughput is the median over the repeats, in MB/s (10^6 bytes per second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtransfer import Destination, KVLayout, TcpTransport  # noqa: E402

LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16")  # 128 KiB per token
MIB = 1 << 20


def plan(sizes_mib: list[int], repeats: int) -> list[tuple[str, int]]:
    """(request_id, num_tokens) of every transfer, in the order they are sent."""
    tokens = {s: s * MIB // LAYOUT.bytes_per_token() for s in sizes_mib}
    return [(f"bench-{s}-{i}", tokens[s]) for s in sizes_mib for i in range(repeats)]


async def receive(requests: list[tuple[str, int]], endpoints: Any, results: Any) -> None:
    transport = TcpTransport(transfer_timeout_s=600)
    endpoints.put(await transport.start_server())
    buffers = {n: torch.empty(LAYOUT.shape(n), dtype=LAYOUT.torch_dtype) for _, n in requests}

    def writer(n: int) -> Any:
        return lambda start, kv: buffers[n][:, :, start : start + kv.shape[2]].copy_(kv)

    receivers = [transport.expect(rid, LAYOUT, n, writer(n)) for rid, n in requests]
    for receiver in receivers:
        result = await receiver.wait(timeout_s=600)
        results.put((result.request_id, result.state.value, result.seconds, result.error))
    await transport.close()


def receiver_main(requests: list[tuple[str, int]], endpoints: Any, results: Any) -> None:
    torch.set_num_threads(1)
    asyncio.run(receive(requests, endpoints, results))


async def send(requests: list[tuple[str, int]], endpoint: str, chunk_mib: int) -> list[dict[str, Any]]:
    transport = TcpTransport(io_timeout_s=120)
    rows = []
    for request_id, n in requests:
        kv = torch.randn(LAYOUT.shape(n)).to(LAYOUT.torch_dtype)
        step = n if chunk_mib <= 0 else max(1, chunk_mib * MIB // LAYOUT.bytes_per_token())
        sender = await transport.open_sender(Destination(request_id, "bench", endpoint, (), n, LAYOUT), LAYOUT)
        for start in range(0, n, step):
            await sender.send(start, kv[:, :, start : start + step])
        result = await sender.finish(first_token=0, timeout_s=120)
        if not result.ok:
            raise SystemExit(f"transfer {request_id} failed: {result.error}")
        rows.append({"request_id": request_id, "bytes": result.bytes, "seconds": result.seconds})
    await transport.close()
    return rows


def summarize(rows: list[dict[str, Any]], sizes_mib: list[int]) -> list[dict[str, Any]]:
    table = []
    for size in sizes_mib:
        mine = [r for r in rows if r["request_id"].startswith(f"bench-{size}-")]
        mbps = [r["bytes"] / r["seconds"] / 1e6 for r in mine]
        table.append(
            {
                "payload_mib": size,
                "bytes": mine[0]["bytes"],
                "repeats": len(mine),
                "median_ms": statistics.median(r["seconds"] for r in mine) * 1e3,
                "median_mb_s": statistics.median(mbps),
                "min_mb_s": min(mbps),
                "max_mb_s": max(mbps),
            }
        )
    return table


def print_table(table: list[dict[str, Any]]) -> None:
    print(f"{'payload':>9} {'median ms':>10} {'MB/s median':>12} {'MB/s min':>9} {'MB/s max':>9}")
    for row in table:
        print(
            f"{row['payload_mib']:>5} MiB {row['median_ms']:>10.2f} {row['median_mb_s']:>12.0f}"
            f" {row['min_mb_s']:>9.0f} {row['max_mb_s']:>9.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="1,4,16,64", help="payload sizes, comma-separated MiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-mib", type=int, default=0, help="split each payload into sends of this size (0: one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    requests = plan(sizes, args.repeats + 1)
    ctx = mp.get_context("spawn")
    endpoints, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=receiver_main, args=(requests, endpoints, results), daemon=True)
    child.start()
    rows = asyncio.run(send(requests, endpoints.get(timeout=60), args.chunk_mib))
    received = [results.get(timeout=60) for _ in requests]
    child.join(timeout=30)
    if bad := [r for r in received if r[1] != "done"]:
        raise SystemExit(f"receiver failures: {bad}")
    warm = [r for r in rows if not r["request_id"].endswith("-0")]
    table = summarize(warm, sizes)
    print(f"TCP loopback, {LAYOUT}, 1 warm-up + {args.repeats} repeats per size, sender-timed to ACK")
    print_table(table)
    if args.json:
        info = {"layout": LAYOUT.to_dict(), "chunk_mib": args.chunk_mib, "torch": torch.__version__}
        args.json.write_text(json.dumps({"config": info, "results": table, "transfers": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
