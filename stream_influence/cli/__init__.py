"""The ``stream-influence`` command line.  Each sub-command lives in its own module here and
exposes ``register(subparsers)``; the handler it sets returns the process exit code."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from stream_influence import __version__
from stream_influence.errors import StreamInfluenceError

# Modules of this package that define sub-commands, in help order.
COMMANDS = ("demo", "config_cmd", "score", "replay", "datasets", "run", "produce", "requeue", "dashboard")

log = logging.getLogger("stream_influence")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-influence",
        description="Route training events a streaming model would only memorise away from its "
        "updater, by their influence on a trusted reference loss.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        # kafka-python logs every connection at INFO; keep it to warnings unless debugging.
        logging.getLogger("kafka").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
        if not args.verbose:  # a dead broker would otherwise fill the terminal
            from stream_influence.observability.logs import RateLimitFilter

            for handler in logging.getLogger().handlers:
                handler.addFilter(RateLimitFilter())
    try:
        return int(args.handler(args) or 0)
    except StreamInfluenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
