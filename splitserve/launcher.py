"""LocalCluster: a whole splitserve deployment on this machine, as child processes, and `splitserve serve`.

    EmbeddedRedis (or --redis-url) ◀── registry ── prefill-0..N-1, decode-0..M-1   (127.0.0.1, free ports)
                     ▲                                     ▲
                     └────────── gateway (--host:--port) ──┘  ◀── Client

Ready means: every worker's key ``<prefix>:worker:<id>`` is in Redis and the gateway's gRPC
health check answers SERVING. Stopping sends SIGTERM to the gateway, then to the workers,
SIGKILL after a grace period, and stops the embedded Redis last.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from splitserve.embedded_redis import EmbeddedRedis, EmbeddedRedisError, free_port

ROLES = ("gateway", "prefill", "decode")
_MODULES = {"gateway": "gateway", "prefill": "prefill_worker", "decode": "decode_worker"}
_ROOT = Path(__file__).resolve().parents[1]
_SETTLE_S = 1.0  # one gateway registry refresh (0.5 s by default), so its view includes every worker


class ClusterError(RuntimeError):
    """The cluster did not come up, or lost a part it cannot serve without; the message names the child."""


class _LogPump(threading.Thread):
    """Reads a child's merged stdout+stderr line by line: keeps the last lines, forwards each one."""

    def __init__(self, stream: IO[bytes], name: str, sink: IO[str] | None, prefix: str) -> None:
        super().__init__(name=f"logs-{name}", daemon=True)
        self.stream, self.sink, self.prefix = stream, sink, prefix
        self.lines: deque[str] = deque(maxlen=200)

    def run(self) -> None:
        for raw in self.stream:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self.lines.append(line)
            if self.sink is not None:
                try:
                    self.sink.write(f"{self.prefix}{line}\n")
                    self.sink.flush()
                except (OSError, ValueError):
                    self.sink = None
        self.stream.close()


@dataclass
class ChildProcess:
    """One gateway or worker process. ``name`` is the worker id (or "gateway")."""

    role: str
    name: str
    popen: subprocess.Popen[bytes]
    pump: _LogPump
    sink: IO[str] | None = None
    expected_exit: bool = False  # set when the cluster stops or kills it on purpose
    reported: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, num_lines: int = 20) -> list[str]:
        """The last lines it wrote; after it exited, waits (briefly) until its pipe is drained."""
        if not self.alive():
            self.pump.join(timeout=2.0)
        return list(self.pump.lines)[-num_lines:]

    def describe(self) -> str:
        kind = "gateway" if self.role == "gateway" else f"{self.role} worker {self.name}"
        code = self.returncode
        if code is None:
            return f"{kind} (pid {self.pid}) is running"
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
        lines = "\n".join(f"    {line}" for line in self.tail()) or "    (it wrote nothing)"
        return f"{kind} (pid {self.pid}) exited with {how}; the last lines it wrote:\n{lines}"


class LocalCluster:
    """A gateway, ``prefill_workers`` + ``decode_workers`` workers and (unless ``redis_url``) an embedded
    Redis, all child processes of this one. ``start()`` returns once ready or raises ClusterError.

    ``worker_options`` / ``gateway_options`` become flags (``{"num_kv_blocks": 256}`` -> ``--num-kv-blocks
    256``). Children's output goes to ``log_dir/<name>.log`` if given, else to ``sys.stderr`` prefixed
    with ``[name]`` when ``echo_logs``, else nowhere; the last 200 lines of each are always kept.
    """

    def __init__(
        self, model: str | Path, *, prefill_workers: int = 1, decode_workers: int = 1, host: str = "127.0.0.1",
        port: int = 0, redis_url: str | None = None, prefix: str | None = None, log_format: str = "console",
        worker_options: Mapping[str, Any] | None = None, gateway_options: Mapping[str, Any] | None = None,
        log_dir: str | Path | None = None, echo_logs: bool = False, ready_timeout_s: float = 120.0,
        stop_grace_s: float = 10.0,
    ) -> None:
        if prefill_workers < 0 or decode_workers < 1:
            raise ValueError(f"need >= 0 prefill and >= 1 decode workers, got {prefill_workers} and {decode_workers}")
        self.model, self.host, self.port, self.log_format = str(model), host, port, log_format
        self.num_workers = {"prefill": prefill_workers, "decode": decode_workers}
        self.redis_url, self.prefix = redis_url or "", prefix or f"splitserve-{uuid.uuid4().hex[:8]}"
        self.worker_options, self.gateway_options = dict(worker_options or {}), dict(gateway_options or {})
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.echo_logs, self.ready_timeout_s, self.stop_grace_s = echo_logs, ready_timeout_s, stop_grace_s
        self.processes: dict[str, ChildProcess] = {}
        self.redis: EmbeddedRedis | None = None
        self._next_index = {"prefill": 0, "decode": 0}
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """host:port where clients reach the gateway (127.0.0.1 when it binds every interface)."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    # -- start -----------------------------------------------------------------------------------
    def start(self) -> LocalCluster:
        """Starts everything and waits until ready; on any failure stops what it started and raises
        (ClusterError naming the child that failed, with its last lines). A cluster starts once."""
        try:
            if not self.redis_url:
                self.redis = EmbeddedRedis()
                try:
                    self.redis_url = self.redis.start().url
                except EmbeddedRedisError as e:
                    raise ClusterError(str(e)) from None
            self.port = self.port or free_port(self.host if self.host not in ("", "::") else "0.0.0.0")
            self._spawn("gateway", "gateway", self._gateway_args())
            ids = [self._spawn_worker(role) for role in ("prefill", "decode") for _ in range(self.num_workers[role])]
            self.wait_ready(ids, gateway=True)
            time.sleep(_SETTLE_S)
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, role: str) -> str:
        """Starts one more prefill or decode worker; returns its id once it is in the registry."""
        worker_id = self._spawn_worker(role)
        try:
            self.wait_ready([worker_id])
        except BaseException:
            self.kill_worker(worker_id, signal.SIGKILL)
            raise
        time.sleep(_SETTLE_S)
        return worker_id

    def _spawn_worker(self, role: str) -> str:
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        with self._lock:
            worker_id = f"{role}-{self._next_index[role]}"
            self._next_index[role] += 1
        args = ["--model", self.model, "--redis-url", self.redis_url, "--prefix", self.prefix, "--host", "127.0.0.1",
                "--port", "0", "--kv-port", "0", "--worker-id", worker_id, "--log-format", self.log_format]
        self._spawn(role, worker_id, args + _flags(self._worker_options()))
        return worker_id

    def _worker_options(self) -> dict[str, Any]:
        options = dict(self.worker_options)
        if "num_kv_blocks" not in options and "kv_cache_memory_fraction" not in options:
            options["kv_cache_memory_fraction"] = round(0.9 / sum(self.num_workers.values()), 4)  # they share a GPU
        return options

    def _gateway_args(self) -> list[str]:
        args = ["--model", self.model, "--redis-url", self.redis_url, "--prefix", self.prefix, "--host", self.host,
                "--port", str(self.port), "--log-format", self.log_format]
        return args + _flags(self.gateway_options)

    def _spawn(self, role: str, name: str, args: list[str]) -> ChildProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
        popen = subprocess.Popen([sys.executable, "-m", _MODULES[role], *args], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        sink: IO[str] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            sink = open(self.log_dir / f"{name}.log", "a", encoding="utf-8")  # noqa: SIM115 (closed in stop)
        elif self.echo_logs:
            sink = sys.stderr
        assert popen.stdout is not None
        pump = _LogPump(popen.stdout, name, sink, prefix="" if self.log_dir is not None else f"[{name}] ")
        pump.start()
        child = ChildProcess(role, name, popen, pump, sink if self.log_dir is not None else None)
        self.processes[name] = child
        return child

    # -- readiness -------------------------------------------------------------------------------
    def wait_ready(self, worker_ids: list[str], gateway: bool = False, timeout_s: float | None = None) -> None:
        """Waits until these workers are in the registry (and the gateway is SERVING); ClusterError if one
        of them exits first or the deadline passes."""
        import redis

        deadline = time.monotonic() + (self.ready_timeout_s if timeout_s is None else timeout_s)
        pending = set(worker_ids) | ({"gateway"} if gateway else set())
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2.0)
        try:
            while pending:
                for name in sorted(pending):
                    child = self.processes[name]
                    if not child.alive():
                        raise ClusterError(f"the cluster did not start: {child.describe()}")
                try:
                    pending -= {w for w in pending - {"gateway"} if client.exists(f"{self.prefix}:worker:{w}")}
                except redis.RedisError as e:
                    raise ClusterError(f"cannot reach Redis at {self.redis_url}: {e}") from None
                if "gateway" in pending and self.gateway_status() == "SERVING":
                    pending.discard("gateway")
                if pending and time.monotonic() > deadline:
                    raise ClusterError(self._not_ready_message(pending))
                time.sleep(0.1)
        finally:
            client.close()

    def gateway_status(self, timeout_s: float = 1.0) -> str:
        """The gateway's health ("SERVING", "NOT_SERVING", ...) or the gRPC error code's name."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            except grpc.RpcError as e:
                return str(e.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def _not_ready_message(self, pending: set[str]) -> str:
        parts = [f"the cluster was not ready after {self.ready_timeout_s:g} s:"]
        for name in sorted(pending):
            child = self.processes[name]
            what = f"health check says {self.gateway_status()}" if name == "gateway" else "not in the registry"
            lines = "\n".join(f"    {line}" for line in child.tail()) or "    (it wrote nothing)"
            parts.append(f"  {name} (pid {child.pid}): {what}; the last lines it wrote:\n{lines}")
        return "\n".join(parts)

    # -- supervision -----------------------------------------------------------------------------
    def exited_unexpectedly(self) -> list[ChildProcess]:
        """Children that exited since the last call, and not because the cluster stopped or killed them."""
        found = [c for c in self.processes.values() if not c.alive() and not c.expected_exit and not c.reported]
        for child in found:
            child.reported = True
        return found

    def missing(self) -> list[str]:
        """What the cluster cannot serve without and has lost: "gateway", "decode worker", "embedded Redis"."""
        roles = {c.role for c in self.processes.values() if c.alive()}
        lost = [f"{r} worker" if r == "decode" else r for r in ("gateway", "decode") if r not in roles]
        if self.redis is not None and (self.redis.process is None or self.redis.process.poll() is not None):
            lost.append("embedded Redis")
        return lost

    def kill_worker(self, worker_id: str, sig: int = signal.SIGKILL, wait_s: float | None = 30.0) -> int | None:
        """Sends ``sig`` to one child (marked as an expected exit); returns its exit code once it exits
        (None if ``wait_s`` is None or it outlives ``wait_s``)."""
        child = self.processes[worker_id]
        child.expected_exit = True
        if child.alive():
            child.popen.send_signal(sig)
        if wait_s is None:
            return None
        try:
            return child.popen.wait(wait_s)
        except subprocess.TimeoutExpired:
            return None

    # -- stop ------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Gateway first, then the workers (SIGTERM; SIGKILL after ``stop_grace_s``), the embedded Redis last.
        Safe to call twice; a Ctrl-C while waiting kills what is left at once."""
        children = list(self.processes.values())
        for child in children:
            child.expected_exit = True
        try:
            self._terminate([c for c in children if c.role == "gateway"])
            self._terminate([c for c in children if c.role != "gateway"])
        finally:
            for child in children:
                if child.alive():
                    child.popen.kill()
                    child.popen.wait()
                child.pump.join(timeout=2.0)
                if child.sink is not None:
                    child.sink.close()
                    child.sink = None
            if self.redis is not None:
                self.redis.stop()

    def _terminate(self, children: list[ChildProcess]) -> None:
        for child in children:
            if child.alive():
                child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for child in children:
            try:
                child.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _flags(options: Mapping[str, Any]) -> list[str]:
    args: list[str] = []
    for name, value in options.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


# -- `splitserve serve` ----------------------------------------------------------------------------
_WORKER_FLAGS = {  # flag -> (type, help)
    "num_kv_blocks": (int, "KV-cache blocks per worker (default: sized from memory)"),
    "dtype": (str, "auto | float32 | float16 | bfloat16"),
    "device": (str, "auto | cpu | cuda"),
    "block_size": (int, "tokens per KV-cache block"),
    "max_num_batched_tokens": (int, "token budget of one engine step"),
    "prefill_chunk_size": (int, "most prompt tokens of one request per step"),
    "kv_cache_memory_fraction": (float, "share of free GPU memory for the KV cache (default: 0.9 / all workers)"),
}
_GATEWAY_FLAGS = {
    "chunk_size": (int, "prefill chunk size of the chunk plan"),
    "short_prompt_threshold": (int, "prompts shorter than this skip the prefill workers"),
    "max_inflight": (int, "requests in flight before RESOURCE_EXHAUSTED"),
}


def add_serve_arguments(p: Any) -> None:
    """The flags of `splitserve serve` on the argparse parser ``p``."""
    p.add_argument("--model", help="checkpoint folder (default: the demo model, written once to "
                   "$SPLITSERVE_CACHE/demo-model, else ~/.cache/splitserve/demo-model)")
    p.add_argument("--prefill-workers", type=int, default=1, help="prefill worker processes, >= 0 (default: 1)")
    p.add_argument("--decode-workers", type=int, default=1, help="decode worker processes, >= 1 (default: 1)")
    p.add_argument("--colocated", action="store_true",
                   help="baseline without disaggregation: prefill and decode on the same engines (every worker is a "
                        "decode worker computing whole prompts in SplitFuse steps; no KV transfer); the worker count "
                        "stays --prefill-workers + --decode-workers, so both modes use the same hardware")
    p.add_argument("--port", type=int, default=50051, help="gateway port; 0 = a free one (default: 50051)")
    p.add_argument("--host", default="127.0.0.1", help="gateway address; workers bind 127.0.0.1 (default: 127.0.0.1)")
    p.add_argument("--redis-url", help="use this Redis instead of starting an embedded one")
    p.add_argument("--prefix", help="Redis key prefix (default: a fresh splitserve-<random> per launch)")
    p.add_argument("--log-format", dest="serve_log_format", choices=("console", "json"), help="children's log format")
    p.add_argument("--log-dir", help="write each child's output to LOG_DIR/<name>.log; by default it goes to "
                   "this process's stderr, each line prefixed with [gateway], [prefill-0], [decode-0], ...")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to come up (default: 120)")
    workers = p.add_argument_group("passed to every worker (see `splitserve decode-worker --help`)")
    for name, (kind, text) in _WORKER_FLAGS.items():
        workers.add_argument(f"--{name.replace('_', '-')}", type=kind, help=text)
    gateway = p.add_argument_group("passed to the gateway (see `splitserve gateway --help`)")
    for name, (kind, text) in _GATEWAY_FLAGS.items():
        gateway.add_argument(f"--{name.replace('_', '-')}", type=kind, help=text)


def cmd_serve(args: Any) -> int:
    """Starts the cluster, prints the ready line, supervises; ValueError (exit 2) for bad flags."""
    cluster = _cluster_from_args(args)
    previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        where = f"files under {cluster.log_dir}" if cluster.log_dir else "stderr"
        print(f"splitserve: starting a gateway, {cluster.num_workers['prefill']} prefill and "
              f"{cluster.num_workers['decode']} decode workers (their logs: {where})", file=sys.stderr)
        try:
            cluster.start()
        except ClusterError as e:
            print(f"splitserve: error: {e}", file=sys.stderr)
            return 1
        print(_ready_message(cluster), flush=True)
        return _supervise(cluster)
    except KeyboardInterrupt:
        print("splitserve: stopping", file=sys.stderr)
        cluster.stop()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _cluster_from_args(args: Any) -> LocalCluster:
    if args.prefill_workers < 0:
        raise ValueError(f"--prefill-workers must be >= 0, got {args.prefill_workers}")
    if args.decode_workers < 1:
        raise ValueError(f"--decode-workers must be >= 1, got {args.decode_workers}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.redis_url is not None and not args.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"--redis-url must start with redis://, rediss:// or unix://, got {args.redis_url!r}")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--model: {args.model} is not a checkpoint folder (no config.json in it)")
    worker_options = {k: getattr(args, k) for k in _WORKER_FLAGS if getattr(args, k) is not None}
    gateway_options = {k: getattr(args, k) for k in _GATEWAY_FLAGS if getattr(args, k) is not None}
    _validate_options(worker_options, gateway_options)
    prefill, decode = args.prefill_workers, args.decode_workers
    if args.colocated:
        prefill, decode = 0, prefill + decode
    return LocalCluster(
        args.model if args.model is not None else demo_model_path(), prefill_workers=prefill,
        decode_workers=decode, host=args.host, port=args.port, redis_url=args.redis_url,
        prefix=args.prefix, log_format=args.serve_log_format or getattr(args, "log_format", "console"),
        worker_options=worker_options, gateway_options=gateway_options, log_dir=args.log_dir,
        echo_logs=args.log_dir is None, ready_timeout_s=args.ready_timeout,
    )


def _validate_options(worker_options: dict[str, Any], gateway_options: dict[str, Any]) -> None:
    """Refuses bad values here (exit 2), rather than in a child a minute later."""
    from pydantic import ValidationError

    from engine.config import EngineConfig

    try:
        EngineConfig(**worker_options)
    except ValidationError as e:
        err = e.errors()[0]
        if not err["loc"]:
            raise ValueError(str(err["msg"]).removeprefix("Value error, ")) from None
        raise ValueError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']} (got {err.get('input')!r})") from None
    for name in ("chunk_size", "short_prompt_threshold", "max_inflight"):
        low = 0 if name == "short_prompt_threshold" else 1
        if gateway_options.get(name, low) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {gateway_options[name]}")


def demo_model_path() -> Path:
    """The cached demo checkpoint, written on first use (to a temporary folder, then renamed into place)."""
    cache = Path(os.environ.get("SPLITSERVE_CACHE") or Path.home() / ".cache" / "splitserve")
    path = cache / "demo-model"
    if not (path / "config.json").is_file():
        from engine.models.demo import write_demo_model

        print(f"splitserve: writing the demo model to {path} (once)", file=sys.stderr)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"demo-model.tmp-{uuid.uuid4().hex[:8]}"
        write_demo_model(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another launcher wrote it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _ready_message(cluster: LocalCluster) -> str:
    workers = f"{cluster.num_workers['prefill']} prefill + {cluster.num_workers['decode']} decode workers"
    return (
        f"splitserve: serving {cluster.model} on {cluster.address} ({workers}, Redis {cluster.redis_url}, "
        f"prefix {cluster.prefix}); Ctrl-C stops it. From Python:\n"
        f"    from splitserve.client import Client\n"
        f"    client = Client({cluster.address!r})\n"
        f"    print(client.generate('Hello, world', max_new_tokens=16).text)"
    )


def _supervise(cluster: LocalCluster, poll_s: float = 0.5) -> int:
    """Reports each child that exits; goes on while the gateway and a decode worker live, else exit 1."""
    while True:
        time.sleep(poll_s)
        exited = cluster.exited_unexpectedly()
        for child in exited:
            print(f"splitserve: {child.describe()}", file=sys.stderr)
        lost = cluster.missing()
        if lost:
            print(f"splitserve: error: stopping everything: no {' and no '.join(lost)} left", file=sys.stderr)
            cluster.stop()
            return 1
        if exited:
            alive = sorted(name for name, c in cluster.processes.items() if c.alive())
            print(f"splitserve: still serving with {', '.join(alive)}", file=sys.stderr)
