"""Gateway and worker settings: flags > SPLITSERVE_* environment > --config file > defaults, one name for each,
one-line refusals with exit status 2 from any source, and a --help that documents every setting."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from engine.config import EngineConfig
from gateway.settings import GatewaySettings, gateway_parser, parse_args
from splitserve.settings_cli import ENV_PREFIX, SettingsError, env_names
from worker_common.settings import ENGINE_SETTINGS, WorkerSettings, parse_worker_args, worker_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SPLITSERVE_* variable of the caller's leaks into these tests; help is printed one option a line."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "1000")


def write(path: Path, values: dict[str, Any]) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items()))
    return path


# -- precedence ------------------------------------------------------------------------------------------------
def test_gateway_flag_beats_environment_beats_file_beats_default(tmp_path: Path, monkeypatch: Any) -> None:
    config = write(tmp_path / "gateway.yaml", {"model": "/from/file", "chunk_size": 10, "max_inflight": 20,
                                                "retries": 3})
    monkeypatch.setenv("SPLITSERVE_CHUNK_SIZE", "11")
    monkeypatch.setenv("SPLITSERVE_MAX_INFLIGHT", "21")
    settings = parse_args(["--config", str(config), "--chunk-size", "12"])
    assert (settings.chunk_size, settings.max_inflight, settings.retries) == (12, 21, 3)
    assert settings.model == Path("/from/file") and settings.registry_refresh_s == 0.5


def test_worker_flag_beats_environment_beats_file_beats_default(tmp_path: Path, monkeypatch: Any) -> None:
    config = write(tmp_path / "worker.json", {"model": "/m", "num_kv_blocks": 10, "block_size": 8, "seed": 5,
                                               "heartbeat_s": 0.25})
    monkeypatch.setenv("SPLITSERVE_NUM_KV_BLOCKS", "11")
    monkeypatch.setenv("SPLITSERVE_BLOCK_SIZE", "32")
    monkeypatch.setenv("SPLITSERVE_PORT", "7001")
    settings = parse_worker_args("decode", ["--config", str(config), "--num-kv-blocks", "12", "--port", "7002"])
    assert (settings.num_kv_blocks, settings.block_size, settings.seed, settings.port) == (12, 32, 5, 7002)
    assert settings.heartbeat_s == 0.25 and settings.max_num_seqs == 256
    engine = settings.engine
    assert isinstance(engine, EngineConfig)
    assert (engine.model, engine.num_kv_blocks, engine.block_size, engine.seed) == ("/m", 12, 32, 5)


def test_the_config_file_can_come_from_the_environment_and_the_flag_wins(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("SPLITSERVE_CONFIG", str(write(tmp_path / "a.yml", {"model": "/a", "retries": 1})))
    assert parse_args([]).retries == 1
    assert parse_args(["--config", str(write(tmp_path / "b.json", {"model": "/b", "retries": 4}))]).retries == 4


def test_built_in_code_keywords_beat_the_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("SPLITSERVE_CHUNK_SIZE", "64")
    monkeypatch.setenv("SPLITSERVE_RETRIES", "5")
    settings = GatewaySettings(model=Path("/m"), chunk_size=128)
    assert (settings.chunk_size, settings.retries) == (128, 5)


def test_empty_and_unrelated_variables_are_ignored(monkeypatch: Any) -> None:
    monkeypatch.setenv("SPLITSERVE_MAX_MODEL_LEN", "")
    monkeypatch.setenv("SPLITSERVE_CACHE", "/tmp/cache")  # the launcher's, not a gateway setting
    monkeypatch.setenv("SPLITSERVE_TOKEN_BUDGET", "1")  # a DeepSpeed alias is no worker setting either
    assert parse_args(["--model", "/m"]).max_model_len is None
    assert parse_worker_args("prefill", ["--model", "/m"]).engine.max_num_batched_tokens == 2048


def test_the_launchers_flags_still_parse() -> None:
    """LocalCluster turns {"num_kv_blocks": 256} into --num-kv-blocks 256, and True into "True"."""
    argv = ["--model", "/m", "--redis-url", "redis://h:1/0", "--prefix", "p", "--host", "127.0.0.1", "--port", "0",
            "--kv-port", "0", "--worker-id", "decode-0", "--log-format", "json", "--num-kv-blocks", "256",
            "--kv-cache-memory-fraction", "0.225", "--dtype", "float32", "--enable-cuda-graph", "True",
            "--enable-pdl", "False"]
    settings = parse_worker_args("decode", argv)
    assert settings.resolved_worker_id("decode") == "decode-0" and settings.log_format == "json"
    assert (settings.engine.num_kv_blocks, settings.engine.kv_cache_memory_fraction) == (256, 0.225)
    assert settings.engine.dtype == "float32" and settings.engine.enable_cuda_graph is True
    assert settings.engine.enable_pdl is False
    assert parse_worker_args("decode", ["--model", "/m", "--replace-with-kernel-inject"]).engine.use_kernels("cpu")


def test_cuda_graph_steps_is_a_worker_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_worker_args("prefill", ["--model", "/m"]).engine.cuda_graph_steps == "all"
    monkeypatch.setenv("SPLITSERVE_CUDA_GRAPH_STEPS", "prefill")
    assert parse_worker_args("prefill", ["--model", "/m", "--enable-cuda-graph", "True"]).engine.cuda_graph_steps \
        == "prefill"
    with pytest.raises(SettingsError, match=r"^--cuda-graph-steps: Input should be 'all', 'decode' or 'prefill'"):
        parse_worker_args("prefill", ["--model", "/m", "--cuda-graph-steps", "chunks"])


# -- EngineConfig and its aliases --------------------------------------------------------------------------------
def test_worker_engine_defaults_are_the_engine_configs() -> None:
    assert WorkerSettings(model="/m").engine == EngineConfig(model="/m")
    assert set(ENGINE_SETTINGS) <= set(EngineConfig.model_fields)


@pytest.mark.parametrize(("name", "value"), [
    ("block_size", 24), ("num_kv_blocks", 0), ("max_num_batched_tokens", 0), ("max_num_seqs", 0),
    ("prefill_chunk_size", 0), ("max_out_tokens", 0), ("cpu_kv_cache_gib", 0), ("kv_cache_memory_fraction", 1.5),
    ("device", "tpu"), ("dtype", "int8"), ("dtype", "float99"),
])
def test_worker_refuses_what_engine_config_refuses_under_its_own_name(name: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        EngineConfig(**{name: value})
    with pytest.raises(ValidationError) as refused:
        WorkerSettings(model="/m", **{name: value})
    assert refused.value.errors()[0]["loc"] == (name,)


def test_engine_config_aliases_are_accepted_and_refused_as_before() -> None:
    config = EngineConfig(token_budget=64, max_batch_size=8, chunk_size=32, kernel_inject=False, max_tokens=128)
    assert (config.max_num_batched_tokens, config.max_num_seqs, config.prefill_chunk_size) == (64, 8, 32)
    assert config.replace_with_kernel_inject is False and config.max_out_tokens == 128
    with pytest.raises(ValidationError, match="not both"):
        EngineConfig(token_budget=64, max_num_batched_tokens=64)
    assert parse_worker_args("decode", ["--model", "/m", "--dtype", "fp16"]).engine.dtype == "float16"


def test_worker_settings_use_the_canonical_names_only(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="unrecognized arguments: --token-budget"):
        parse_worker_args("decode", ["--model", "/m", "--token-budget", "64"])
    config = write(tmp_path / "w.yaml", {"model": "/m", "token_budget": 64})
    with pytest.raises(SettingsError, match=r"^token_budget in .*w\.yaml: not a setting of this process$"):
        parse_worker_args("decode", ["--config", str(config)])


def test_cross_field_engine_errors_are_one_line() -> None:
    with pytest.raises(SettingsError, match=r"^prefill_chunk_size \(4096\) exceeds max_num_batched_tokens \(2048\)$"):
        parse_worker_args("decode", ["--model", "/m", "--prefill-chunk-size", "4096"])


# -- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("source", "says"), [
    ("flag", "--chunk-size: Input should be greater than or equal to 1 (got '0')"),
    ("env", "SPLITSERVE_CHUNK_SIZE: Input should be greater than or equal to 1 (got '0')"),
    ("file", "chunk_size in {file}: Input should be greater than or equal to 1 (got 0)"),
])
def test_gateway_refuses_a_bad_value_from_any_source_in_one_line(
    source: str, says: str, tmp_path: Path, monkeypatch: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import gateway.__main__

    argv = ["--model", "/m"]
    if source == "flag":
        argv += ["--chunk-size", "0"]
    elif source == "env":
        monkeypatch.setenv("SPLITSERVE_CHUNK_SIZE", "0")
    else:
        argv += ["--config", str(write(tmp_path / "g.yaml", {"chunk_size": 0}))]
    assert gateway.__main__.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"splitserve gateway: error: {says.format(file=tmp_path / 'g.yaml')}\n"


@pytest.mark.parametrize(("source", "says"), [
    ("flag", "--num-kv-blocks: Input should be greater than or equal to 1 (got '0')"),
    ("env", "SPLITSERVE_BLOCK_SIZE: must be a power of two in 1..256, got 24"),
    ("file", "kv_cache_memory_fraction in {file}: Input should be less than or equal to 1 (got 2)"),
])
def test_worker_refuses_a_bad_value_from_any_source_in_one_line(
    source: str, says: str, tmp_path: Path, monkeypatch: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker_common.runtime import run_worker

    argv = ["--model", "/m"]
    if source == "flag":
        argv += ["--num-kv-blocks", "0"]
    elif source == "env":
        monkeypatch.setenv("SPLITSERVE_BLOCK_SIZE", "24")
    else:
        argv += ["--config", str(write(tmp_path / "w.json", {"kv_cache_memory_fraction": 2}))]
    assert run_worker("prefill", lambda runtime: None, kv_server=False, argv=argv) == 2
    err = capsys.readouterr().err
    assert err == f"splitserve prefill-worker: error: {says.format(file=tmp_path / 'w.json')}\n"


@pytest.mark.parametrize(("argv", "says"), [
    ([], r"^model: required: give --model, SPLITSERVE_MODEL or model in the --config file$"),
    (["--model", "/m", "--bogus"], r"^unrecognized arguments: --bogus$"),
    (["--model", "/m", "--config", "/nonexistent.yaml"], r"^--config /nonexistent\.yaml: No such file"),
    (["--model", "/m", "--config", "{folder}/settings.toml"], r"must end in \.json, \.yaml or \.yml$"),
    (["--config", "{folder}/bad.yaml"], r"^--config .*bad\.yaml: not valid YAML at line 2"),
    (["--config", "{folder}/list.json"], r"must hold a mapping of settings, not a list$"),
    (["--model", "/m", "--log-format", "xml"], r"^--log-format: Input should be 'console' or 'json' \(got 'xml'\)$"),
])
def test_bad_input_is_one_line(argv: list[str], says: str, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("model: [\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SettingsError, match=says) as refused:
        parse_args([arg.format(folder=tmp_path) for arg in argv])
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("command", [
    ["gateway", "--model", "/m"], ["decode-worker", "--model", "/m"],
])
def test_a_bad_environment_variable_stops_the_process_with_exit_2(command: list[str]) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}, "SPLITSERVE_PORT": "70000"}
    out = subprocess.run([sys.executable, "-m", "splitserve.cli", *command], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr == (f"splitserve {command[0]}: error: SPLITSERVE_PORT: Input should be less than or equal to "
                          f"65535 (got '70000')\n")


# -- help ----------------------------------------------------------------------------------------------------------
def shown(value: Any) -> str:
    if value is None:
        return "none"
    if value == "":
        return '""'
    return str(value).lower() if isinstance(value, bool) else str(value)


def option_entries(help_text: str) -> dict[str, str]:
    """--flag -> its whole entry in --help (argparse may put the text on the lines below the flag)."""
    entries: dict[str, str] = {}
    flag = ""
    for line in help_text.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line.strip()
        elif flag and line.startswith("   "):
            entries[flag] += " " + line.strip()
        else:
            flag = ""
    return entries


@pytest.mark.parametrize(("settings_cls", "parser"), [
    (GatewaySettings, gateway_parser), (WorkerSettings, lambda: worker_parser("prefill")),
    (WorkerSettings, lambda: worker_parser("decode")),
])
def test_help_lists_every_setting_with_its_default_and_variable(settings_cls: Any, parser: Any) -> None:
    text = parser().format_help()
    for name, field in settings_cls.model_fields.items():
        flag, env = "--" + name.replace("_", "-"), "SPLITSERVE_" + name.upper()
        default = "required" if field.is_required() else f"default: {shown(field.default)}"
        entry = option_entries(text).get(flag, "")
        assert entry.endswith(f"({default}; env {env})"), (name, entry)
    assert "--config FILE" in text and "SPLITSERVE_CONFIG" in text
    assert env_names(settings_cls) == {"SPLITSERVE_" + n.upper() for n in settings_cls.model_fields} | {
        "SPLITSERVE_CONFIG"}


def test_splitserve_gateway_help_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "splitserve.cli", "gateway", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and out.stdout.startswith("usage: splitserve gateway")
    assert re.search(r"--chunk-size N +prefill chunk size C \(default: 512; env SPLITSERVE_CHUNK_SIZE\)", out.stdout)


# -- where workers are reached ---------------------------------------------------------------------------------------
def test_a_worker_binding_every_interface_advertises_its_hostname() -> None:
    assert WorkerSettings(model="/m", host="0.0.0.0").advertised(7) == f"{socket.gethostname()}:7"
    assert WorkerSettings(model="/m", host="0.0.0.0", advertise_host="w1").advertised(7) == "w1:7"
    assert WorkerSettings(model="/m").advertised(7) == "127.0.0.1:7"
