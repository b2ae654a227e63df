"""``stream-influence run --config cfg.yaml``: the Kafka consumer service."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stream_influence.config import AppSettings

log = logging.getLogger(__name__)


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
    p.add_argument(
        "--role",
        choices=("all", "score", "update"),
        default="all",
        help="all (default): one process scores, routes and learns; score: a score worker (N of "
        "them in the input's consumer group) routes against the latest model snapshot and publishes "
        "every valid event with its decision to kafka.updates_topic; update: the one updater learns "
        "from that topic and publishes model snapshots to kafka.model_topic (docs/architecture.md)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="if checkpoints exist but none passes verification, set them aside (*.corrupt) and "
        "start with an empty model instead of refusing to start; a usable checkpoint is still "
        "restored",
    )
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from stream_influence.config import check_environment, load_config
    from stream_influence.errors import ConfigError
    from stream_influence.observability.logs import setup_logging

    cfg = load_config(args.config)
    problems = check_environment(cfg)
    if problems:
        lines = "\n".join("  " + p.line() for p in problems)
        raise ConfigError(f"{args.config or 'environment'}: {len(problems)} invalid setting(s):\n{lines}")
    setup_logging(cfg.logging, verbose=args.verbose, secrets=cfg.kafka.secret_values())
    if args.fresh:
        _set_aside_unusable(cfg)
    from stream_influence.service.loop import (
        run_service,  # imported after the check: it loads the whole engine
    )

    if args.role == "all":
        return run_service(cfg, config_path=args.config)
    from stream_influence.service.roles import run_role

    return run_role(cfg, args.role, config_path=args.config)


def _set_aside_unusable(cfg: AppSettings) -> None:
    """``--fresh``: without a usable checkpoint, move the corrupt ones aside so the service starts
    with an empty model (resuming at the committed offsets).  Incompatible settings still stop it."""
    from stream_influence.errors import NoUsableCheckpoint
    from stream_influence.service.checkpoint import CheckpointStore

    store = CheckpointStore(cfg.checkpoint.directory, cfg.checkpoint.keep)
    try:
        store.latest(cfg.engine)
    except NoUsableCheckpoint:
        moved = store.set_aside()
        log.warning(
            "--fresh: no usable checkpoint; %d file(s) set aside as *.corrupt, starting with an empty model",
            len(moved),
        )
