"""The in-process engine's public API: input refusals, init_inference, sampling, stops, abort and ordering."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig
from engine.engine import Engine, init_inference
from engine.request import RequestStatus, SamplingParams

NUM_BLOCKS = 64
PROMPT = [5, 17, 300, 2, 44, 9, 130]
OTHER_PROMPTS = [[7] * 23, list(range(100, 140)), [1]]



def make_engine(model_dir: Any, **overrides: Any) -> Engine:
    """Budget and chunk small enough that batch companions change which step computes what."""
    cfg = dict(model=str(model_dir), dtype="float32", block_size=4, num_kv_blocks=NUM_BLOCKS,
               max_num_batched_tokens=16, prefill_chunk_size=8, max_num_seqs=8)
    return Engine(EngineConfig(**{**cfg, **overrides}))


def greedy(n: int = 12, **kw: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


def assert_idle_and_working(engine: Engine, expected: list[int]) -> None:
    """Nothing queued, every block free, and a good request still gives the expected tokens."""
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.block_manager.num_free_blocks == NUM_BLOCKS
    assert engine.generate([PROMPT], greedy())[0].token_ids == expected
    assert engine.scheduler.block_manager.num_free_blocks == NUM_BLOCKS


@pytest.fixture(scope="module")
def llama(make_checkpoint: Any) -> Path:
    return make_checkpoint("llama")


@pytest.fixture(scope="module")
def expected(llama: Path) -> list[int]:
    """Greedy tokens of PROMPT, computed alone on a fresh engine."""
    tokens = make_engine(llama).generate([PROMPT], greedy())[0].token_ids
    assert len(set(tokens)) > 3, "a degenerate model would hide mistakes"
    return tokens


@pytest.fixture(scope="module")
def no_tokenizer(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("no-tok") / "m"
    shutil.copytree(llama, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    return folder


# -- bad input ------------------------------------------------------------------------------------
BAD_PROMPTS = {  # prompt, max_new_tokens, what the error says
    "empty text": ("", 5, "prompt is empty"),
    "empty ids": ([], 5, "prompt is empty"),
    "id == vocab_size": ([1, 512, 2], 5, "token id 512 is outside the vocabulary [0, 512)"),
    "negative id": ([3, -1], 5, "token id -1 is outside the vocabulary"),
    "past max_model_len": ([1] * 1020, 5, "1020 prompt tokens + 5 max new tokens exceed max_model_len 1024"),
    "past the KV pool": ([1] * 250, 10, "260 tokens need 65 KV blocks, the pool has only 64"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_bad_prompt_is_refused_and_the_engine_keeps_working(llama: Path, expected: list[int], case: str) -> None:
    prompt, max_new_tokens, message = BAD_PROMPTS[case]
    engine = make_engine(llama)
    sp = SamplingParams(max_new_tokens=max_new_tokens)
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.add_request(prompt, sp)
    assert_idle_and_working(engine, expected)
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.generate([prompt], sp)
    assert_idle_and_working(engine, expected)


@pytest.mark.parametrize("n", [0, -3])
def test_max_new_tokens_below_one_is_refused_by_sampling_params(n: int) -> None:
    with pytest.raises(ValueError, match=f"max_new_tokens must be at least 1, got {n}"):
        SamplingParams(max_new_tokens=n)


def test_text_prompt_without_a_tokenizer_is_refused(no_tokenizer: Path, expected: list[int]) -> None:
    engine = make_engine(no_tokenizer)
    assert engine.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer: pass prompt token ids"):
        engine.add_request("hello")
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.add_request(PROMPT, greedy(stop=["x"]))
    out = engine.generate([PROMPT], greedy())[0]
    assert (out.token_ids, out.text) == (expected, "")
    assert_idle_and_working(engine, expected)


def test_duplicate_request_id_is_refused(llama: Path, expected: list[int]) -> None:
    engine = make_engine(llama)
    engine.add_request(PROMPT, greedy(), request_id="a")
    with pytest.raises(ValueError, match="'a' is already in the scheduler"):
        engine.add_request([1, 2], greedy(), request_id="a")
    while engine.has_unfinished_requests():
        engine.step()
    assert_idle_and_working(engine, expected)



def test_generate_with_one_bad_prompt_queues_nothing(llama: Path) -> None:
    engine = make_engine(llama)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([PROMPT, [1, 9999]], greedy())
    assert not engine.has_unfinished_requests()


def test_sampling_list_of_the_wrong_length_is_refused(llama: Path, expected: list[int]) -> None:
    engine = make_engine(llama)
    with pytest.raises(ValueError, match="got 1 sampling params for 2 prompts"):
        engine.generate([PROMPT, [1]], [greedy()])
    assert_idle_and_working(engine, expected)


# -- init_inference -------------------------------------------------------------------------------
def test_init_inference_takes_deepspeed_keys(llama: Path, expected: list[int]) -> None:
    engine = init_inference(llama, {"tp": 1, "dtype": "fp32", "kernel_inject": False, "max_tokens": 256},
                            num_kv_blocks=NUM_BLOCKS, block_size=4)
    cfg = engine.config
    assert (cfg.tp_size, cfg.dtype, cfg.replace_with_kernel_inject, cfg.max_out_tokens) == (1, "float32", False, 256)
    assert engine.max_model_len == 256
    assert engine.runner.dtype == torch.float32 and not cfg.use_kernels("cuda")
    assert engine.generate([PROMPT], greedy())[0].token_ids == expected


def test_init_inference_from_a_transformers_model(llama: Path, expected: list[int]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    engine = init_inference(model, {"dtype": "fp32", "num_kv_blocks": NUM_BLOCKS, "block_size": 4})
    assert engine.config.model is None and engine.tokenizer is None
    assert engine.generate([PROMPT], greedy())[0].token_ids == expected


def test_init_inference_from_a_model_built_in_memory() -> None:
    """from_config leaves config.architectures empty: the model type must be enough."""
    from transformers import AutoModelForCausalLM

    from engine.models.demo import hf_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config("qwen2"), dtype=torch.float32).eval()
    assert not model.config.architectures
    engine = init_inference(model, {"dtype": "fp32", "num_kv_blocks": NUM_BLOCKS, "block_size": 4})
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=0)[0, len(PROMPT):].tolist()
    assert engine.generate([PROMPT], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids == ref


def test_init_inference_refuses_unknown_keys(llama: Path) -> None:
    with pytest.raises(ValidationError, match="bogus"):
        init_inference(llama, {"bogus": 1})


def test_init_inference_refuses_other_objects() -> None:
    with pytest.raises(TypeError, match="not int"):
        init_inference(42)


# -- sampling -------------------------------------------------------------------------------------
def seeded(seed: int | None, **kw: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=10, temperature=1.5, seed=seed, ignore_eos=True, **kw)


def test_same_seed_same_tokens_across_engines_and_batches(llama: Path, expected: list[int]) -> None:
    alone = make_engine(llama).generate([PROMPT], seeded(42))[0].token_ids
    other = make_engine(llama, seed=7).generate([PROMPT], seeded(42))[0].token_ids
    batch = make_engine(llama).generate(
        [*OTHER_PROMPTS, PROMPT], [seeded(1), greedy(), seeded(None), seeded(42)]
    )[-1].token_ids
    assert alone == other == batch
    assert len(alone) == 10 and alone != expected[:10], "temperature 1.5 should leave greedy"


def test_different_seeds_give_different_tokens(llama: Path) -> None:
    outs = make_engine(llama).generate([PROMPT] * 4, [seeded(s) for s in range(4)])
    assert len({tuple(o.token_ids) for o in outs}) == 4


def test_top_k_1_samples_the_greedy_tokens(llama: Path, expected: list[int]) -> None:
    outs = make_engine(llama).generate([PROMPT, PROMPT], [seeded(None, top_k=1), seeded(3, top_k=1)])
    assert [o.token_ids for o in outs] == [expected[:10]] * 2


# -- stopping -------------------------------------------------------------------------------------
def test_stop_token_id_ends_the_request(llama: Path, expected: list[int]) -> None:
    stop = expected[5]
    first = expected.index(stop)
    out = make_engine(llama).generate([PROMPT], greedy(stop_token_ids=[stop]))[0]
    assert out.token_ids == expected[: first + 1]
    assert out.token_ids[-1] == stop and out.finish_reason == "stop"


def test_eos_stops_unless_ignore_eos(llama: Path, tmp_path: Path) -> None:
    """A copy whose eos logit (id 0) is twice that of a token greedy emits, so eos must come out."""
    folder = tmp_path / "eos"
    shutil.copytree(llama, folder)
    engine = make_engine(llama)
    assert engine.eos_token_ids == frozenset({0})
    likely = engine.generate([PROMPT], greedy())[0].token_ids[3]
    weights = load_file(str(folder / "model.safetensors"))
    weights["lm_head.weight"][0] = 2 * weights["lm_head.weight"][likely]
    save_file(weights, str(folder / "model.safetensors"))

    engine = make_engine(folder)
    ignoring = engine.generate([PROMPT], greedy(16))[0]
    assert 0 in ignoring.token_ids and len(ignoring.token_ids) == 16 and ignoring.finish_reason == "length"
    stopping = engine.generate([PROMPT], SamplingParams(max_new_tokens=16))[0]
    end = ignoring.token_ids.index(0) + 1
    assert stopping.token_ids == ignoring.token_ids[:end]
    assert stopping.finish_reason == "stop"
    assert engine.scheduler.block_manager.num_free_blocks == NUM_BLOCKS


def test_generation_config_eos_ids_override_config(llama: Path, expected: list[int], tmp_path: Path) -> None:
    folder = tmp_path / "gen"
    shutil.copytree(llama, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, expected[6]]}))
    engine = make_engine(folder)
    assert engine.eos_token_ids == frozenset({0, expected[6]})
    out = engine.generate([PROMPT], SamplingParams(max_new_tokens=12))[0]
    assert out.token_ids == expected[: expected.index(expected[6]) + 1] and out.finish_reason == "stop"


def pick_stop_string(text: str) -> tuple[str, int]:
    """A 3-character piece of ``text`` past its first third, clean of U+FFFD, at its first occurrence."""
    for k in range(len(text) // 3, len(text) - 3):
        piece = text[k : k + 3]
        if "\ufffd" not in piece and text.find(piece) == k:
            return piece, k
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_string_cuts_text_right_before_it(llama: Path) -> None:
    engine = make_engine(llama)
    full = engine.generate(["The quick brown fox"], greedy(20))[0]
    stop, at = pick_stop_string(full.text)
    out = engine.generate(["The quick brown fox"], greedy(20, stop=["zzzzzz", stop]))[0]
    assert out.text == full.text[:at] and out.finish_reason == "stop"
    assert 0 < len(out.token_ids) < len(full.token_ids)
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert stop in engine.tokenizer.decode(out.token_ids)
    assert stop not in engine.tokenizer.decode(out.token_ids[:-1])
    assert engine.scheduler.block_manager.num_free_blocks == NUM_BLOCKS


def test_without_detokenize_only_stop_string_requests_get_text(llama: Path) -> None:
    """Workers (detokenize=False) skip text, except where a stop string needs it; tokens are unchanged."""
    full = make_engine(llama).generate(["The quick brown fox"], greedy(20))[0]
    stop, at = pick_stop_string(full.text)
    engine = Engine(make_engine(llama).config, detokenize=False)
    plain, stopped = engine.generate(["The quick brown fox"] * 2, [greedy(20), greedy(20, stop=[stop])])
    assert plain.token_ids == full.token_ids and plain.text == ""
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:at]
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]


def test_stop_string_on_the_last_allowed_token_reports_stop(llama: Path) -> None:
    engine = make_engine(llama)
    full = engine.generate(["The quick brown fox"], greedy(20))[0]
    stop, at = pick_stop_string(full.text)
    n = len(engine.generate(["The quick brown fox"], greedy(20, stop=[stop]))[0].token_ids)
    out = engine.generate(["The quick brown fox"], greedy(n, stop=[stop]))[0]
    assert out.text == full.text[:at]
    assert out.finish_reason == "stop"


# -- abort and ordering ---------------------------------------------------------------------------
def test_abort_mid_generation_frees_blocks_at_once(llama: Path, expected: list[int]) -> None:
    engine = make_engine(llama)
    victim = engine.add_request(list(range(1, 21)), greedy(30))
    survivor = engine.add_request(OTHER_PROMPTS[0], greedy(6))
    seen: dict[str, int] = {victim: 0, survivor: 0}
    for _ in range(5):
        for out in engine.step():
            seen[out.request_id] += len(out.new_token_ids)
    request = engine.scheduler.get_request(victim)
    assert request is not None and seen[victim] > 0 and not request.is_finished
    held, free = len(request.block_ids), engine.scheduler.block_manager.num_free_blocks
    assert held >= 5

    assert engine.abort_request(victim)
    assert engine.scheduler.block_manager.num_free_blocks == free + held
    assert request.status == RequestStatus.FINISHED_ABORTED and request.block_ids == []
    assert not engine.abort_request(victim) and not engine.abort_request("nobody")

    assert engine.generate([PROMPT], greedy())[0].token_ids == expected
    assert engine.scheduler.get_request(survivor) is None and not engine.has_unfinished_requests()
    assert engine.scheduler.block_manager.num_free_blocks == NUM_BLOCKS


def test_abort_a_waiting_request(llama: Path, expected: list[int]) -> None:
    engine = make_engine(llama)
    rid = engine.add_request(PROMPT, greedy())
    assert engine.abort_request(rid)
    assert_idle_and_working(engine, expected)


def test_generate_returns_outputs_in_input_order(llama: Path) -> None:
    prompts = [PROMPT, *OTHER_PROMPTS]
    params = [greedy(n) for n in (14, 2, 9, 5)]  # the first one finishes last
    batch = make_engine(llama).generate(prompts, params)
    alone = [make_engine(llama).generate([p], s)[0] for p, s in zip(prompts, params, strict=True)]
    assert [o.prompt_token_ids for o in batch] == prompts
    assert [len(o.token_ids) for o in batch] == [14, 2, 9, 5]
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]
    assert all(o.finished and o.finish_reason == "length" for o in batch)


def test_generate_takes_a_single_prompt(llama: Path, expected: list[int]) -> None:
    engine = make_engine(llama)
    assert [o.token_ids for o in engine.generate(PROMPT, greedy())] == [expected]
    assert len(engine.generate("hello", greedy(3))) == 1
