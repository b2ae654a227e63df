"""``stream-influence requeue --from-quarantine``: give quarantined events a second chance.

Reads the whole quarantine topic (all partitions, outside any consumer group), re-scores every
event against the model of the **latest checkpoint** (without changing it) and re-publishes the
ones that now pass — the routing policy in force (its evidence, floor and disagreement gate; the
rate cap off) would accept them — to the training-events topic
(or ``--to TOPIC``), keyed by event id, with a ``requeued_from`` header
(``topic:partition:offset``).  Nothing is deleted: events that still do not pass stay in the
quarantine topic for a later run.

A ledger (``requeue-ledger.json`` in the checkpoint directory, or ``--ledger``) records which
quarantine messages were re-published, so running the command twice does not feed the same
message to the model twice.  An event that is quarantined *again* after a requeue is a new
quarantine message and is eligible again.  ``--dry-run`` only reports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream_influence.config import AppSettings, limit_blas_threads, load_config
from stream_influence.core.router import Router
from stream_influence.core.scorer import Scorer
from stream_influence.core.snapshot import ModelSnapshot
from stream_influence.errors import ConfigError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "requeue",
        help="re-score quarantined events against the latest checkpoint; re-publish those that pass",
    )
    p.add_argument(
        "--from-quarantine",
        action="store_true",
        required=True,
        help="read kafka.quarantine_topic (the only source supported)",
    )
    p.add_argument("--config", type=Path, help="the service's YAML file")
    p.add_argument("--to", metavar="TOPIC", help="publish here instead of kafka.topic")
    p.add_argument("--ledger", type=Path, help="default: <checkpoint.directory>/requeue-ledger.json")
    p.add_argument("--dry-run", action="store_true", help="score and report, publish nothing")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to read the quarantine topic")
    p.set_defaults(handler=_requeue)


@dataclass
class RequeueReport:
    scanned: int = 0
    passed: int = 0
    still_quarantined: int = 0
    already_requeued: int = 0
    duplicates: int = 0
    invalid: int = 0
    published: int = 0
    passed_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("passed_ids")
        return d


def _read_all(cfg: AppSettings, topic: str, timeout: float) -> list[Any]:
    from stream_influence.io.broker import open_broker
    from stream_influence.io.reference import ReferenceReader

    # All partitions from the beginning, no group.
    reader = ReferenceReader(open_broker(cfg.kafka), topic, max_records=cfg.kafka.max_poll_records)
    try:
        msgs, complete = reader.read_to_end(timeout)
    finally:
        reader.close()
    if not complete:
        raise ConfigError(f"could not read {topic} to its end within {timeout}s")
    return msgs


def pass_mask(snapshot: ModelSnapshot, raws: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(valid, passes)`` per raw message: passes = the snapshot's routing policy (its evidence,
    floor and disagreement gate, rate cap off) would accept it now.  Read-only."""
    valid = np.zeros(len(raws), dtype=bool)
    passes = np.zeros(len(raws), dtype=bool)
    if snapshot.theta is None or snapshot.reference_size == 0:
        return valid, passes
    scorer = Scorer(snapshot)
    batch, _ = scorer.decode(raws)
    if len(batch) == 0:
        return valid, passes
    valid[batch.index] = True
    evidence = scorer.evidence(batch)
    router = Router.from_snapshot(snapshot, rate_cap=False)
    decision = router.decide(evidence, warm=True)
    passes[batch.index] = np.isfinite(evidence.scores.get(router.score_kind)) & ~decision.quarantine
    return valid, passes


def requeue(
    cfg: AppSettings, *, to: str | None, ledger: Path, dry_run: bool, timeout: float
) -> RequeueReport:
    from stream_influence.io.broker import BrokerTrouble, OutputRecord, open_broker
    from stream_influence.io.records import OWN_HEADERS
    from stream_influence.service.checkpoint import CheckpointStore

    ck = CheckpointStore(cfg.checkpoint.directory, cfg.checkpoint.keep).latest(cfg.engine)
    if ck is None:
        raise ConfigError(f"no checkpoint in {cfg.checkpoint.directory}: nothing to score against")
    if ck.engine.policy.settings != cfg.engine.policy:
        ck.engine.set_policy(cfg.engine.policy)  # the configuration's thresholds decide what passes
    if not ck.engine.warm:
        raise ConfigError(f"the model in {ck.path.name} is not warm yet ({ck.engine.not_warm_reason()})")
    qtopic = cfg.kafka.quarantine_topic
    done: set[str] = set(json.loads(ledger.read_text())["requeued"]) if ledger.exists() else set()
    msgs = _read_all(cfg, qtopic, timeout)
    report = RequeueReport(scanned=len(msgs))

    # The newest quarantine copy of each event id (the service may have written duplicates).
    latest: dict[bytes | None, Any] = {}
    for m in msgs:
        coord = f"{m.topic}:{m.partition}:{m.offset}"
        if coord in done:
            report.already_requeued += 1
            continue
        if m.key in latest:
            report.duplicates += 1
        latest[m.key] = m
    todo = list(latest.values())
    # s = H⁻¹∇L_R refreshed for the checkpoint's head, on the snapshot (the checkpoint is not changed).
    valid, passes = pass_mask(ck.engine.snapshot(refresh=True), [m.value for m in todo])
    report.invalid = int((~valid).sum())
    report.passed = int(passes.sum())
    report.still_quarantined = len(todo) - report.passed - report.invalid
    target = to or cfg.kafka.topic
    chosen = [m for m, ok in zip(todo, passes.tolist(), strict=True) if ok]
    report.passed_ids = [m.key.decode() if m.key else "" for m in chosen]
    if dry_run or not chosen:
        return report
    producer = open_broker(cfg.kafka).producer()
    try:
        deliveries = []
        for m in chosen:
            headers = [(n, v) for n, v in (m.headers or []) if n not in OWN_HEADERS and n != "requeued_from"]
            headers.append(("requeued_from", f"{m.topic}:{m.partition}:{m.offset}".encode()))
            deliveries.append(
                producer.produce(OutputRecord(target, key=m.key, value=m.value, headers=headers))
            )
        with contextlib.suppress(BrokerTrouble):  # what was not acknowledged is not in the ledger
            producer.flush(cfg.kafka.flush_timeout_seconds)
        ok = [m for m, d in zip(chosen, deliveries, strict=True) if d.done and d.error is None]
    finally:
        producer.close(cfg.kafka.flush_timeout_seconds)
    report.published = len(ok)
    done.update(f"{m.topic}:{m.partition}:{m.offset}" for m in ok)
    from stream_influence.core.state import atomic_write

    atomic_write(ledger, json.dumps({"requeued": sorted(done)}).encode())
    return report


def _requeue(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    limit_blas_threads(cfg.blas_threads)
    ledger = args.ledger or Path(cfg.checkpoint.directory) / "requeue-ledger.json"
    report = requeue(cfg, to=args.to, ledger=ledger, dry_run=args.dry_run, timeout=args.timeout)
    target = args.to or cfg.kafka.topic
    verb = "would re-publish" if args.dry_run else f"re-published {report.published} to {target};"
    print(
        f"{report.scanned} quarantine messages scanned: {report.passed} now pass ({verb}), "
        f"{report.still_quarantined} still quarantined, {report.already_requeued} requeued before, "
        f"{report.duplicates} duplicates, {report.invalid} invalid",
        file=sys.stdout,
    )
    return 0 if args.dry_run or report.published == report.passed else 1
