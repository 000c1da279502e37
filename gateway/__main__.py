"""`splitserve gateway` / `python -m gateway`: one gateway process; a bad setting prints one line and exits 2."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

from gateway.server import StartError, serve
from gateway.settings import GatewaySettings, SettingsError, parse_args
from gateway.tokenizer import ModelFolderError
from splitserve.logs import configure_logging


async def run_until_signalled(settings: GatewaySettings) -> None:
    """Serves until SIGINT or SIGTERM, then stops gracefully."""
    gateway = await serve(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.stop(grace_s=5.0)


def main(argv: Sequence[str] | None = None, prog: str = "splitserve gateway") -> int:
    """Settings from flags, SPLITSERVE_* variables and --config FILE (see --help), then serves until signalled."""
    try:
        settings = parse_args(argv, prog)
    except SettingsError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    try:
        asyncio.run(run_until_signalled(settings))
    except ModelFolderError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except StartError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="gateway"))
