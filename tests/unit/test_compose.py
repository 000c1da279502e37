"""compose.yaml, compose.gpu.yaml and the Dockerfile, checked against the CLI and the settings they drive.

Docker cannot run where these tests run, so they check what compose would hand each container: a real
`splitserve` subcommand with real flags, SPLITSERVE_* variables that are settings of that role and that validate,
no fixed host port but the gateway's, health checks that answer as compose expects (run against a gRPC health
server here), GPUs for workers only. The slow test runs the services' own commands and variables as local
processes (Redis local, ports free ones) and gets tokens through the gateway.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.settings import GatewaySettings, gateway_parser
from splitserve.cli import build_parser
from splitserve.settings_cli import ENV_PREFIX, ProcessSettings, env_names, load_settings
from worker_common.settings import WorkerSettings, worker_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
GPU = yaml.safe_load((ROOT / "compose.gpu.yaml").read_text())
ROLES: dict[str, tuple[type[ProcessSettings], Any]] = {
    "gateway": (GatewaySettings, gateway_parser),
    "prefill-worker": (WorkerSettings, lambda: worker_parser("prefill")),
    "decode-worker": (WorkerSettings, lambda: worker_parser("decode")),
}
WORKERS = ("prefill", "decode")


def merged(base: Any, override: Any) -> Any:
    """compose's merge of an override file, for the keys these files use: mappings merge, the rest is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: merged(base[k], v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override}
    return override


BOTH = {"compose.yaml": COMPOSE["services"],
        "compose.yaml + compose.gpu.yaml": merged(COMPOSE, GPU)["services"]}


def ours(services: dict[str, Any]) -> dict[str, Any]:
    """The services that run our image (all but redis)."""
    return {name: s for name, s in services.items() if not s["image"].startswith("redis")}


def role_services(services: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str]]:
    for name, service in ours(services).items():
        if "entrypoint" not in service:
            yield name, service, service["command"][0]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._option_string_actions)


# -- commands, flags and variables ------------------------------------------------------------------------------------
@pytest.mark.parametrize("files", BOTH)
def test_every_service_runs_a_real_subcommand_with_flags_it_has(files: str) -> None:
    commands = subcommands()
    services = ours(BOTH[files])
    assert {role for _, _, role in role_services(services)} == set(ROLES)
    for name, service in services.items():
        if "entrypoint" in service:  # the one-shot model writer: a shell script that calls splitserve
            assert service["entrypoint"] == ["sh", "-c"], name
            calls = [shlex.split(c) for c in re.findall(r"splitserve [^;&|}]+", service["command"][0])]
        else:
            calls = [["splitserve", *service["command"]]]
        assert calls, name
        for _, sub, *args in calls:
            assert sub in commands, (name, sub)
            parser = ROLES[sub][1]() if sub in ROLES else commands[sub]
            flags = {a.split("=")[0] for a in args if a.startswith("--")}
            assert flags <= options(parser), (name, flags - options(parser))


@pytest.mark.parametrize("files", BOTH)
def test_every_settings_variable_is_a_setting_of_that_role_and_valid(files: str, monkeypatch: Any) -> None:
    for name, service, role in role_services(BOTH[files]):
        settings_cls, parser = ROLES[role]
        env = {k: str(v) for k, v in service["environment"].items()}
        unknown = {k for k in env if k.startswith(ENV_PREFIX)} - env_names(settings_cls)
        assert not unknown, (name, unknown)
        for k in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        settings = load_settings(settings_cls, parser(), service["command"][1:])
        assert str(settings.model).startswith("/models/") and settings.redis_url == "redis://redis:6379/0"


def test_the_services_read_their_settings_from_the_environment_only() -> None:
    for name, service, _ in role_services(COMPOSE["services"]):
        assert service["command"][1:] == [], name


# -- ports, names, health ------------------------------------------------------------------------------------------
def published(service: dict[str, Any]) -> list[str]:
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append(str(port.get("published", "")))
        else:
            parts = str(port).split(":")
            out.append(parts[-2] if len(parts) > 1 else "")  # "8080" alone publishes on a random host port
    return out


@pytest.mark.parametrize("files", BOTH)
def test_only_the_gateway_publishes_a_fixed_host_port(files: str) -> None:
    services = BOTH[files]
    fixed = {name: [p for p in published(s) if p] for name, s in services.items()}
    assert {name: p for name, p in fixed.items() if p} == {"gateway": ["50051"]}
    assert services["gateway"]["environment"]["SPLITSERVE_PORT"] == "50051"
    assert all("container_name" not in s and "hostname" not in s for s in services.values())


@pytest.mark.parametrize("files", BOTH)
def test_every_service_has_a_health_check_that_probes_its_own_port(files: str) -> None:
    services = BOTH[files]
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name, service, _ in role_services(services):
        test = service["healthcheck"]["test"]
        assert test[1:3] == ["python", "-c"], name
        assert test[4] == f"127.0.0.1:{service['environment']['SPLITSERVE_PORT']}", name


@pytest.mark.parametrize("files", BOTH)
def test_workers_register_under_their_container_hostname(files: str) -> None:
    for name in WORKERS:
        env = BOTH[files][name]["environment"]
        assert env["SPLITSERVE_HOST"] == "0.0.0.0" and "SPLITSERVE_ADVERTISE_HOST" not in env
        assert "SPLITSERVE_WORKER_ID" not in env  # scaled replicas must not share an id
        settings = WorkerSettings(model="/m", host=env["SPLITSERVE_HOST"])
        assert settings.advertised(50052) == f"{socket.gethostname()}:50052"


def test_the_model_folder_is_written_once_and_mounted_read_only() -> None:
    services = COMPOSE["services"]
    assert services["model"]["volumes"] == ["models:/models"] and services["model"]["restart"] == "no"
    for name, service, _ in role_services(services):
        assert "models:/models:ro" in service["volumes"], name
        assert service["depends_on"] == {"redis": {"condition": "service_healthy"},
                                         "model": {"condition": "service_completed_successfully"}}, name
    assert "models" in COMPOSE["volumes"]


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def probe(service: str, address: str) -> int:
    """Runs the service's health check, with this Python and against ``address``: its exit code."""
    test = COMPOSE["services"][service]["healthcheck"]["test"]
    argv = [sys.executable, *test[2:4], address, *test[5:]]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode


def test_the_grpc_health_checks_answer_as_compose_expects(health_server: Any) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("splitserve.v1.Generation", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe("decode", address) == 0 and probe("prefill", address) == 0
    assert probe("gateway", address) == 1  # up, but no decode worker in the registry yet
    servicer.set("splitserve.v1.Generation", health_pb2.HealthCheckResponse.SERVING)
    assert probe("gateway", address) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    assert probe("decode", closed) == 1


# -- the GPU override and the image -----------------------------------------------------------------------------------
def test_the_gpu_override_reserves_one_gpu_for_each_worker_and_nothing_else() -> None:
    services = merged(COMPOSE, GPU)["services"]
    reserved = {name for name, s in services.items() if "deploy" in s}
    assert reserved == set(WORKERS)
    for name in WORKERS:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert services[name]["environment"]["SPLITSERVE_DEVICE"] == "cuda"
        assert services[name]["environment"]["SPLITSERVE_KV_CACHE_MEMORY_FRACTION"] == "0.45"
    assert services["decode"]["environment"]["SPLITSERVE_ENABLE_CUDA_GRAPH"] == "true"
    assert "SPLITSERVE_CUDA_GRAPH_STEPS" not in services["decode"]["environment"]  # all: decode and lone chunks
    assert services["prefill"]["environment"]["SPLITSERVE_ENABLE_CUDA_GRAPH"] == "true"
    assert services["prefill"]["environment"]["SPLITSERVE_CUDA_GRAPH_STEPS"] == "prefill"
    for name, service in ours(services).items():
        assert service["build"]["args"]["TORCH_INDEX"] != "https://download.pytorch.org/whl/cpu", name
        assert service["image"] != COMPOSE["services"][name]["image"], name  # the CPU image stays as it is


def test_the_dockerfile_builds_one_small_non_root_image() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(stages) == 2 and all(s.startswith("python:${PYTHON_VERSION}-slim") for s in stages)
    assert "ARG PYTHON_VERSION=3.11" in text
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text and "ARG TORCH_VERSION=" in text
    final = text.split("\nFROM ")[-1]
    assert "COPY --from=build /opt/splitserve /opt/splitserve" in final and "COPY . " not in final
    assert re.search(r"^USER splitserve$", final, re.M) and 'ENTRYPOINT ["splitserve"]' in final
    assert "pip install /src" in text and "-e /src" not in text
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert {".git", ".venv", "**/__pycache__", ".pytest_cache"} <= set(ignored)
    assert "README.md" not in ignored and "pyproject.toml" not in ignored


# -- the services as local processes ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_env(service: dict[str, Any], models: Path, redis_url: str, port: int) -> dict[str, str]:
    """The service's variables as compose sets them, with /models, Redis and the ports moved to this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in service["environment"].items()})
    env.update(SPLITSERVE_MODEL=env["SPLITSERVE_MODEL"].replace("/models", str(models), 1),
               SPLITSERVE_REDIS_URL=redis_url, SPLITSERVE_PORT=str(port), OMP_NUM_THREADS="1")
    if "SPLITSERVE_KV_PORT" in env:
        env["SPLITSERVE_KV_PORT"] = "0"
    try:
        socket.gethostbyname(socket.gethostname())
    except OSError:
        env["SPLITSERVE_ADVERTISE_HOST"] = "127.0.0.1"  # where this machine's own name does not resolve
    return env


@pytest.mark.slow
def test_the_services_commands_and_variables_make_a_working_cluster(tmp_path: Path) -> None:
    import redis

    from splitserve.client import Client
    from splitserve.embedded_redis import EmbeddedRedis

    services = COMPOSE["services"]
    script = services["model"]["command"][0].replace("/models", str(tmp_path))
    env = local_env(services["gateway"], tmp_path, "", 0)
    for _ in range(2):  # the second run finds the folder and writes nothing
        subprocess.run(["sh", "-c", script], check=True, env=env, capture_output=True, timeout=300)
    assert (tmp_path / "demo" / "config.json").is_file() and not (tmp_path / ".demo.tmp").exists()

    with EmbeddedRedis() as server:
        procs: list[subprocess.Popen[bytes]] = []
        try:
            ports = {}
            for name in ("gateway", "prefill", "decode", "decode"):  # like --scale decode=2
                ports[name] = port = free_port()
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "splitserve.cli", *services[name]["command"]], cwd=tmp_path,
                    env=local_env(services[name], tmp_path, server.url, port), stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 240
            while probe("gateway", f"127.0.0.1:{ports['gateway']}") != 0:
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "not healthy in time"
                time.sleep(1.0)
            while len(redis.Redis.from_url(server.url).keys("splitserve:worker:*")) < 3:
                assert time.monotonic() < deadline, "the workers did not all register"
                time.sleep(0.5)
            assert probe("prefill", f"127.0.0.1:{ports['prefill']}") == 0
            with Client(f"127.0.0.1:{ports['gateway']}", timeout=60) as client:
                result = client.generate(list(range(1, 60)), max_new_tokens=4, ignore_eos=True)
            assert len(result.token_ids) == 4
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)
