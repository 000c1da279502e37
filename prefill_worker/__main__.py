"""`python -m prefill_worker` (also `splitserve prefill-worker`)."""

from __future__ import annotations

import sys

from prefill_worker.server import PrefillServicer
from worker_common.runtime import run_worker


def main(argv: list[str] | None = None) -> int:
    return run_worker("prefill", PrefillServicer, kv_server=False, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
