"""``stream-influence run --config cfg.yaml``: the Kafka consumer service."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="consume training events from Kafka, route them by influence, update the model",
        description="Run the service: consume the training-events topic in a consumer group, "
        "score every event, update the model with accepted ones, produce quarantined events and "
        "dead letters to their topics, checkpoint the model with its input offsets. "
        "SIGTERM/SIGINT stop it gracefully; SIGHUP (or editing the file) reloads engine.policy.",
    )
    p.add_argument("--config", type=Path, help="YAML file (STREAM_INFLUENCE_… environment overrides apply)")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from ..config import check_environment, load_config
    from ..errors import ConfigError
    from ..kafka_io import check_broker
    from ..logs import setup_logging

    cfg = load_config(args.config)
    problems = check_environment(cfg)
    if problems:
        lines = "\n".join("  " + p.line() for p in problems)
        raise ConfigError(f"{args.config or 'environment'}: {len(problems)} invalid setting(s):\n{lines}")
    setup_logging(cfg.logging, verbose=args.verbose, secrets=cfg.kafka.secret_values())
    # Fail in seconds with the cause, not after every client's own timeout in turn.
    check_broker(cfg.kafka)
    from ..service import run_service  # imported after the check: it loads the whole engine

    return run_service(cfg, config_path=args.config)
