"""The `splitserve` command line: demo-model and generate in real processes, and one-line refusals.

demo-model and generate run the console script in subprocesses (each pays seconds of imports, so
there are few). The rest runs ``main()`` in this process, where an unhandled exception would
surface as the test's own error, just as a traceback would in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import SamplingParams
from splitserve import cli

SMALL = ["--dtype", "float32", "--num-kv-blocks", "64"]



def splitserve(*args: str) -> subprocess.Popen[str]:
    """Start the CLI; one intra-op thread each, so that processes running side by side do not spin."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "splitserve.cli", *args], text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """demo-model, then generate from its folder, each in a subprocess; a parser refusal goes alongside."""
    folder = tmp_path_factory.mktemp("cli") / "demo"
    first = {
        "demo": splitserve("demo-model", str(folder)),
        "bad ids": splitserve("generate", "--model", str(folder), "--prompt-token-ids", "1,x"),
    }
    done = {name: finish(proc) for name, proc in first.items()}
    base = ["generate", "--model", str(folder), *SMALL, "--max-new-tokens", "5", "--ignore-eos", "--json"]
    second = {"ids": splitserve(*base, "--prompt-token-ids", "1,2,3"), "text": splitserve(*base, "--prompt", "hello")}
    return {"folder": folder, **done, **{name: finish(proc) for name, proc in second.items()}}


@pytest.fixture(scope="module")
def demo(runs: dict[str, Any]) -> Path:
    rc, out, err = runs["demo"]
    assert rc == 0, err
    assert str(runs["folder"]) in out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in runs["folder"].iterdir()}
    return runs["folder"]


@pytest.fixture(scope="module")
def engine(demo: Path) -> Engine:
    return Engine(EngineConfig(model=str(demo), dtype="float32", num_kv_blocks=64))


def printed_json(run: tuple[int, str, str]) -> dict[str, Any]:
    rc, out, err = run
    assert rc == 0 and "Traceback" not in err, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, f"stdout should hold the JSON line only: {out!r}"
    return json.loads(lines[0])


def assert_one_line_error(rc: Any, err: str, prefix: str, *says: str) -> None:
    assert rc == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(prefix), err
    for words in says:
        assert words in errors[0], err


def test_generate_token_ids_match_the_engine(runs: dict[str, Any], engine: Engine) -> None:
    printed = printed_json(runs["ids"])
    expected = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert printed == {"token_ids": expected.token_ids, "text": expected.text, "finish_reason": "length"}
    assert len(printed["token_ids"]) == 5


def test_generate_text_prompt_matches_the_engine(runs: dict[str, Any], engine: Engine) -> None:
    printed = printed_json(runs["text"])
    expected = engine.generate(["hello"], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert printed["token_ids"] == expected.token_ids and len(expected.token_ids) == 5
    assert printed["text"] == expected.text and printed["finish_reason"] == "length"


def test_subprocess_parser_refusal_is_one_line(runs: dict[str, Any]) -> None:
    rc, out, err = runs["bad ids"]
    assert_one_line_error(rc, err, "splitserve generate: error:", "--prompt-token-ids", "'1,x'")
    assert out == ""


# -- refusals, in this process -------------------------------------------------------------------
REFUSALS = {  # extra arguments after `generate --model DEMO --dtype float32 --num-kv-blocks 64`
    "both prompts": (["--prompt", "hi", "--prompt-token-ids", "1,2"],
                     ["exactly one of --prompt or --prompt-token-ids"]),
    "no prompt": ([], ["exactly one of --prompt or --prompt-token-ids"]),
    "empty prompt": (["--prompt", ""], ["prompt is empty"]),
    "empty token ids": (["--prompt-token-ids", ""], ["prompt is empty"]),
    "id past vocab": (["--prompt-token-ids=1,512"], ["token id 512 is outside the vocabulary"]),
    "negative id": (["--prompt-token-ids=-1,2"], ["token id -1 is outside the vocabulary"]),
    "zero new tokens": (["--prompt", "hi", "--max-new-tokens", "0"], ["max_new_tokens must be at least 1, got 0"]),
    "negative temperature": (["--prompt", "hi", "--temperature", "-1"], ["temperature must be >= 0"]),
    "too long": (["--prompt-token-ids", "1,2", "--max-new-tokens", "3000"], ["exceed max_model_len 2048"]),
    "no such model": (["--model", "/nonexistent/splitserve-model", "--prompt", "hi"],
                      ["model folder '/nonexistent/splitserve-model' does not exist"]),
}


def run_main(argv: list[str], capsys: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, str, str]:
    monkeypatch.setattr(cli, "configure_logging", lambda *a: None)  # keep structlog's global set-up intact
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_generate_input_exits_2_with_one_line(case: str, demo: Path, capsys: Any, monkeypatch: Any) -> None:
    extra, says = REFUSALS[case]
    rc, _, err = run_main(["generate", "--model", str(demo), *SMALL, *extra], capsys, monkeypatch)
    assert_one_line_error(rc, err, "splitserve: error:", *says)
    assert err.count("\n") == 1


def test_unparsable_token_ids_are_refused_by_the_parser(demo: Path, capsys: Any, monkeypatch: Any) -> None:
    rc, _, err = run_main(["generate", "--model", str(demo), "--prompt-token-ids", "1,,x"], capsys, monkeypatch)
    assert_one_line_error(rc, err, "splitserve generate: error:", "expected comma-separated integers")


def test_folder_without_weights_is_refused(demo: Path, tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    (tmp_path / "config.json").write_text((demo / "config.json").read_text())
    argv = ["generate", "--model", str(tmp_path), *SMALL, "--prompt-token-ids", "1"]
    rc, _, err = run_main(argv, capsys, monkeypatch)
    assert_one_line_error(rc, err, "splitserve: error:", "has no weights", "model.safetensors")



def test_bad_block_size_is_one_line(demo: Path, capsys: Any, monkeypatch: Any) -> None:
    rc, _, err = run_main(["generate", "--model", str(demo), *SMALL, "--block-size", "24", "--prompt", "hi"],
                       capsys, monkeypatch)
    assert_one_line_error(rc, err, "splitserve: error:", "block_size", "power of two", "24")
    assert err.count("\n") == 1
