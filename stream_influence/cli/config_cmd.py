"""``stream-influence config show|check``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stream_influence.config import check_file, example_yaml, load_config, reference_markdown
from stream_influence.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the effective configuration or check a file")
    cs = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = cs.add_parser("show", help="print the effective configuration (secrets masked)")
    show.add_argument("--config", type=Path, help="YAML file (environment overrides apply)")
    show.set_defaults(handler=_show)
    check = cs.add_parser(
        "check",
        help="validate a file (fields, cross-field rules, checkpoint directory, metrics port, TLS "
        "files) and print every error with its path",
    )
    check.add_argument("file", type=Path)
    check.set_defaults(handler=_check)
    example = cs.add_parser("example", help="print a commented YAML file with every setting")
    example.set_defaults(handler=lambda args: print(example_yaml(), end="") or 0)
    ref = cs.add_parser("reference", help="print the configuration reference (Markdown)")
    ref.set_defaults(handler=lambda args: print(reference_markdown(), end="") or 0)


def _show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    # mode="json" renders SecretStr as '**********'.
    print(json.dumps(cfg.model_dump(mode="json", by_alias=True), indent=2))
    return 0


def _check(args: argparse.Namespace) -> int:
    try:
        lines = check_file(args.file)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if lines:
        print(f"{args.file}: {len(lines)} invalid setting(s):", *lines, sep="\n", file=sys.stderr)
        print(
            "hint: `stream-influence config show` prints every field with its default;"
            " deploy/config.example.yaml documents them.",
            file=sys.stderr,
        )
        return 1
    print(f"{args.file}: OK")
    return 0
