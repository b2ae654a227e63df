"""Reading fetched records on kafka-python: the backend's fast path (``io/kafka_python._PlainRecords``
over ``io/record_batches.read_batches``) beside kafka-python's own parser, on the same bytes.

    nice .venv/bin/python benchmarks/fetch_path.py [--events 100000] [--write-docs]

1. In memory: the service benchmark's events (d=64, ~640 bytes) in v2 batches built by
   kafka-python's own batch builder (16 kB, as its producer cuts them; and one 1 MB batch), read
   by ``Fetcher.PartitionRecords`` and by ``_PlainRecords`` with CRC checks on, handed out 512 at
   a time as ``poll(max_records=512)`` takes them; thread CPU per record, alternating, best of 5.
2. On the local broker: the same events consumed from one partition (no group) through the
   backend's consumer (``poll(500, 512)``) with the fast path, the same consumer with the fast
   path off (kafka-python's parser: what the backend did before), and a plain ``KafkaConsumer``;
   records/s of wall and of process CPU, alternating, best of 2.

Writes the ``fetch_path`` section of docs/benchmarks.md with ``--write-docs``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docs_section import write_section  # noqa: E402
from kafka import KafkaConsumer  # noqa: E402
from kafka import TopicPartition as KafkaTP  # noqa: E402
from kafka.consumer.fetcher import Fetcher  # noqa: E402
from kafka.record import MemoryRecords  # noqa: E402
from kafka.version import __version__ as kafka_version  # noqa: E402

from stream_influence.config import KafkaSettings  # noqa: E402
from stream_influence.io import kafka_python as kp  # noqa: E402
from stream_influence.io.broker import TopicPartition, open_broker  # noqa: E402
from tests.fixtures.broker import Broker, fresh_topic  # noqa: E402
from tests.fixtures.service_events import events  # noqa: E402
from tests.test_fetch_path import TP, batch_bytes  # noqa: E402


def fetch_bytes(values: list[bytes], per_batch_bytes: int) -> bytes:
    out, batch, size, base = [], [], 0, 0
    for v in values:
        batch.append((len(batch), 1_790_000_000_000 + len(batch), None, v, []))
        size += len(v) + 8
        if size >= per_batch_bytes:
            out.append(batch_bytes(batch, base_offset=base))
            base += len(batch)
            batch, size = [], 0
    if batch:
        out.append(batch_bytes(batch, base_offset=base))
    return b"".join(out)


def parse_cpu(cls: type, buf: bytes) -> float:
    """Thread CPU µs per record to read ``buf`` and take every record, 512 at a time."""
    t = time.thread_time()
    part = cls(0, TP, MemoryRecords(buf), check_crcs=True)
    n = 0
    while part:
        n += len(part.take(512))
    return (time.thread_time() - t) / n * 1e6


def consume(bootstrap: str, topic: str, n: int, how: str) -> tuple[float, float]:
    """Records/s of wall and of process CPU to read ``n`` records (clocks from the first record)."""
    if how == "kafka-python KafkaConsumer":
        c: Any = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        c.assign([KafkaTP(topic, 0)])
        c.seek(KafkaTP(topic, 0), 0)

        def poll() -> Any:
            return c.poll(timeout_ms=500, max_records=512)

        close = c.close
    else:
        versions = kp.FETCH_VERSIONS
        if how.endswith("off"):
            kp.FETCH_VERSIONS = frozenset()
        try:
            b = open_broker(KafkaSettings(bootstrap_servers=bootstrap, topic=topic)).consumer(group=False)
        finally:
            kp.FETCH_VERSIONS = versions
        assert b.plain_fetches == how.endswith("on")
        b.assign([TopicPartition(topic, 0)])
        b.seek(TopicPartition(topic, 0), 0)

        def poll() -> Any:
            return b.poll(500, 512)

        def close() -> None:
            b.close(5000)

    got, t0, c0 = 0, 0.0, 0.0
    while got < n:
        polled = poll()
        if polled and not got:
            t0, c0 = time.perf_counter(), time.process_time()
        got += sum(len(m) for m in polled.values())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    close()
    return n / wall, n / cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    values, _ = events(args.events, d=64, k=10, noise=0.3, seed=2)
    memory: dict[str, dict[str, float]] = {}
    for label, per_batch in (("16 kB batches", 16_384), ("one 1 MB batch", 1 << 20)):
        buf = fetch_bytes(values[:1600], per_batch)
        runs: dict[str, list[float]] = {"kafka-python": [], "fast path": []}
        for _ in range(5):
            runs["kafka-python"].append(parse_cpu(Fetcher.PartitionRecords, buf))
            runs["fast path"].append(parse_cpu(kp._PlainRecords, buf))
        memory[label] = {k: min(v) for k, v in runs.items()}
    ways = ("backend, fast path on", "backend, fast path off", "kafka-python KafkaConsumer")
    broker = Broker().start()
    try:
        from service import produce_fast  # benchmarks/ is on sys.path as the script directory

        topic = fresh_topic(broker, "fetch-bench")
        produce_fast(broker.bootstrap, topic, values)
        rates: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
        for _ in range(2):
            for w in ways:
                rates[w].append(consume(broker.bootstrap, topic, len(values), w))
    finally:
        broker.stop()
    load_after = os.getloadavg()[0]
    best = {w: (max(r[0] for r in rs), max(r[1] for r in rs)) for w, rs in rates.items()}
    for label, m in memory.items():
        print(f"in memory, {label}: " + ", ".join(f"{k} {v:.2f} µs/record" for k, v in m.items()))
    for w, (wall, cpu) in best.items():
        print(f"broker, {w}: {wall:,.0f} records/s, {cpu:,.0f} per CPU-second")
    if args.write_docs:
        rows = "\n".join(
            f"| {label} | {m['kafka-python']:.2f} | {m['fast path']:.2f} | {m['kafka-python'] / m['fast path']:.1f}× |"
            for label, m in memory.items()
        )
        brows = "\n".join(f"| {w} | {wall:,.0f} | {cpu:,.0f} |" for w, (wall, cpu) in best.items())
        body = f"""## fetch_path: reading fetched records on kafka-python

`nice .venv/bin/python benchmarks/fetch_path.py --events {args.events} --write-docs`
({platform.machine()}, {os.cpu_count()} CPUs, 1-min load average {load_before:.1f} before and
{load_after:.1f} after; Python {platform.python_version()}, kafka-python {kafka_version}; local Tansu broker).
The service benchmark's events (d=64, ~640 bytes, no key, no headers).

In memory, 1,600 records (one fetch's worth) in v2 batches built by kafka-python's batch builder,
CRC checked, taken 512 at a time; thread CPU per record, the two alternating, best of 5:

| batches | kafka-python's parser, µs/record | fast path, µs/record | |
|---|---:|---:|---:|
{rows}

On the broker, {args.events:,} records of one partition read without a group, 512 per poll (no
decoding); alternating, best of 2:

| consumer | records/s | records per CPU-second |
|---|---:|---:|
{brows}

Reading is a small part of a bare consume loop on this broker: kafka-python sends a partition's
next fetch only once the records of the last one are all handed out, and the loop then waits for
it on the client's I/O thread, which waits on the socket (a thread sampler over the fast-path run
found the loop thread waiting most of the time).  The saving shows where the loop thread has
other work between polls: in the service it is the loop thread's time in `poll` (the profile in
the `service` section).

What the fast path reproduces, and what takes kafka-python's own parser: `_PlainRecords` in
`stream_influence/io/kafka_python.py`; checked against kafka-python by tests/test_fetch_path.py.
"""
        write_section("fetch_path", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
