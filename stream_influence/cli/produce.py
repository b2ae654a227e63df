"""``stream-influence produce EVENTS.jsonl --topic T``: load a JSON Lines file into Kafka.

Every non-blank line is sent as one message, byte for byte (malformed lines too: the service
dead-letters them, which is what tests and demos want).  The producer batches (``--linger-ms``,
``--batch-bytes``) and flushes at the end; the exit status is non-zero if any message failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from stream_influence.config import KafkaSettings, load_config
from stream_influence.offline.jsonl import iter_lines


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("produce", help="load a JSON Lines file of events into a Kafka topic")
    p.add_argument("file", type=Path, help="events, one JSON object per line ('-' reads stdin)")
    p.add_argument("--topic", help="target topic (default: kafka.topic of the configuration)")
    p.add_argument("--bootstrap", help="bootstrap servers host:port[,host:port] (default: configuration)")
    p.add_argument("--config", type=Path, help="YAML file for connection and security settings")
    p.add_argument("--key-from-id", action="store_true", help="use each event's id as the message key")
    p.add_argument("--linger-ms", type=int, default=20, help="producer batching delay (default 20)")
    p.add_argument("--batch-bytes", type=int, default=1 << 20, help="producer batch size (default 1 MiB)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the summary line")
    p.set_defaults(handler=_produce)


def _lines(path: Path) -> Iterator[bytes]:
    """The file's events ("-": stdin); a blank line is not an event and is not sent."""
    return iter_lines(path, skip_blank=True)


def _key_of(line: bytes) -> bytes | None:
    try:
        eid = json.loads(line).get("id")
    except (ValueError, AttributeError):
        return None
    return str(eid).encode() if eid is not None else None


def produce_lines(
    k: KafkaSettings,
    topic: str,
    lines: Iterable[bytes],
    *,
    key_from_id: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Send every line as one message; returns ``(sent, failed)`` after a final flush."""
    from stream_influence.io.broker import BrokerTrouble, OutputRecord, open_broker

    producer = open_broker(k).producer()
    deliveries: list[Any] = []  # not yet answered
    sent = failed = 0
    try:
        for line in lines:
            key = _key_of(line) if key_from_id else None
            deliveries.append(producer.produce(OutputRecord(topic, key, line, [])))
            sent += 1
            if sent % 1000 == 0:
                if progress is not None:
                    progress(1000)
                failed += sum(1 for d in deliveries if d.failed())
                deliveries = [d for d in deliveries if not d.done]
        with contextlib.suppress(BrokerTrouble):  # what was not acknowledged in time counts as failed
            producer.flush(k.flush_timeout_seconds)
        if progress is not None:
            progress(sent % 1000)
    finally:
        producer.close(k.flush_timeout_seconds)
    failed += sum(1 for d in deliveries if not d.done or d.error is not None)
    return sent, failed


def _produce(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    update: dict[str, object] = {
        "producer_linger_ms": args.linger_ms,
        "producer_batch_bytes": args.batch_bytes,
        "client_id": "stream-influence-produce",
    }
    if args.bootstrap:
        update["bootstrap_servers"] = args.bootstrap
    k = cfg.kafka.model_copy(update=update)
    topic = args.topic or k.topic
    t0 = time.perf_counter()
    if args.quiet or not sys.stderr.isatty():
        sent, failed = produce_lines(k, topic, _lines(args.file), key_from_id=args.key_from_id)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        total = None if str(args.file) == "-" else sum(1 for _ in _lines(args.file))
        with Progress(
            TextColumn(f"producing to {topic}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        ) as bar:
            task = bar.add_task("produce", total=total)
            sent, failed = produce_lines(
                k, topic, _lines(args.file), key_from_id=args.key_from_id,
                progress=lambda n: bar.advance(task, n),
            )  # fmt: skip
    dt = time.perf_counter() - t0
    print(
        f"{sent - failed} of {sent} events produced to {topic} in {dt:.1f}s ({sent / max(dt, 1e-9):,.0f}/s)"
    )
    return 1 if failed else 0
