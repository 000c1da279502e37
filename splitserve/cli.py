"""The `splitserve` command line. Bad input prints one clear line and exits with status 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from splitserve.logs import configure_logging


class UsageError(Exception):
    """Input the user can fix; reported as `splitserve: error: ...` with exit code 2."""


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", required=True, help="local Hugging Face checkpoint folder")
    g.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16 (default: auto)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default: 16)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step (default: 2048)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one step (default: 256)")
    g.add_argument("--prefill-chunk-size", type=int, default=512, help="most prompt tokens of one request per step")
    g.add_argument("--seed", type=int, default=0, help="seed for unseeded sampling (default: 0)")


def _engine_config(args: argparse.Namespace) -> Any:
    from engine.config import EngineConfig

    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs, prefill_chunk_size=args.prefill_chunk_size, seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.engine import Engine
    from engine.request import SamplingParams

    if (args.prompt is None) == (args.prompt_token_ids is None):
        raise UsageError("give exactly one of --prompt or --prompt-token-ids")
    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.sampling_seed, stop=tuple(args.stop or ()), ignore_eos=args.ignore_eos,
    )
    engine = Engine(_engine_config(args))
    prompt = args.prompt if args.prompt is not None else args.prompt_token_ids
    out = engine.generate([prompt], sampling)[0]
    if args.json:
        print(json.dumps({"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason}))
    else:
        print(out.text if engine.tokenizer is not None else " ".join(map(str, out.token_ids)))
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from engine.models.demo import write_demo_model

    path = write_demo_model(args.dir)
    print(f"wrote the demo model to {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from splitserve.launcher import cmd_serve as serve

    return serve(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from splitserve.bench import run

    return run(args)


_PROCESSES = {"gateway": "gateway", "prefill-worker": "prefill_worker", "decode-worker": "decode_worker"}


def cmd_process(args: argparse.Namespace) -> int:
    """`gateway`, `prefill-worker`, `decode-worker`: the process's own flags and --help, as `python -m`."""
    import importlib

    main = importlib.import_module(f"{_PROCESSES[args.command]}.__main__").main
    return int(main(list(args.process_argv)) or 0)


def _add_process_commands(sub: Any) -> None:
    for name, what in (("gateway", "the public gRPC endpoint"), ("prefill-worker", "one prefill worker"),
                       ("decode-worker", "one decode worker")):
        p = sub.add_parser(name, add_help=False, help=f"run {what} (`splitserve {name} --help` for its flags)")
        p.set_defaults(func=cmd_process, process_argv=[])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__)
    parser.add_argument("--log-format", choices=("console", "json"), default="console")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate offline with an in-process engine")
    _add_engine_flags(gen)
    gen.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    gen.add_argument("--prompt-token-ids", type=_token_ids, help="prompt as token ids, e.g. 1,2,3")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request seed: same seed, same tokens")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": ...}')
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo-model", help="write the small random demo checkpoint to DIR")
    demo.add_argument("dir")
    demo.set_defaults(func=cmd_demo_model)

    from splitserve.launcher import add_serve_arguments

    serve = sub.add_parser("serve", help="a whole cluster on this machine: Redis, gateway, prefill and decode workers",
                           description="Starts an embedded Redis (unless --redis-url), a gateway and the workers as "
                           "child processes, waits until they are ready, prints the address, then supervises them "
                           "until Ctrl-C or SIGTERM. Exits 1 if they do not come up, or if the gateway or the last "
                           "decode worker dies.")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    from splitserve.bench import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="load a running gateway and report TTFT, TPOT, ITL, E2E latency, goodput",
                           description="A load generator against a running gateway (streaming gRPC), with "
                           "vLLM benchmark_serving's definitions: Poisson arrivals at each --request-rate in turn, "
                           "a table per rate, optionally every request in --json and a --plot versus the rate.")
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    _add_process_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.func is cmd_process:
        args.process_argv = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    configure_logging(args.log_format, args.log_level)
    try:
        return args.func(args)
    except (UsageError, ValueError) as e:
        print(f"splitserve: error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(error: Exception) -> str:
    """pydantic's ValidationError spans several lines and a URL; say each problem in one line."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors(include_url=False)
        )
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
