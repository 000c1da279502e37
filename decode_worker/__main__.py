"""`python -m decode_worker` (also `splitserve decode-worker`)."""

from __future__ import annotations

import sys

from decode_worker.server import DecodeServicer
from worker_common.runtime import run_worker


def main(argv: list[str] | None = None) -> int:
    return run_worker("decode", DecodeServicer, kv_server=True, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
