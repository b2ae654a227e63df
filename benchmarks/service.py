"""End-to-end throughput of ``stream-influence run`` on the local test broker, next to the raw
kafka-python consume + ``json.loads`` rate measured in the same run (the issue's baseline) and
the raw consume + ``orjson.loads`` rate (the decoder the engine uses: the honest comparison).

    nice .venv/bin/python benchmarks/service.py [--events 100000] [--write-docs]

Steps (one fresh broker, fresh topics):
1. produce N events (d=64, K=10, 30 % label noise) + 300 clean reference events;
2. baselines: a group-less kafka-python consumer reads the N records and ``json.loads`` each,
   then ``orjson.loads`` each (two runs of each, alternating; the faster of each is kept);
3. the service (in-process, real broker, default batch/checkpoint settings except the checkpoint
   directory) consumes the same N events from the beginning: routes, learns, produces the
   quarantine/dead-letter outputs and checkpoints; the clock runs from its first poll until the
   final checkpoint and commit after the last event;
4. p50/p99 poll→commit latency per processed batch (the time from the poll that delivered a
   batch to the offset commit that covers it).

Writes the ``service`` section of docs/benchmarks.md with ``--write-docs``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docs_section import write_section  # noqa: E402  (benchmarks/ is on sys.path as the script directory)
from kafka import KafkaConsumer, TopicPartition  # noqa: E402

from stream_influence.config import AppSettings  # noqa: E402
from stream_influence.service.loop import Service  # noqa: E402
from tests.fixtures.broker import Broker, fresh_topic  # noqa: E402
from tests.fixtures.service_events import events, produce  # noqa: E402

D, K = 64, 10
# A deployment knows its classes and width; configured like benchmarks/engine.py.
ENGINE = {"schema": {"classes": list(range(K)), "n_features": D}}


def raw_consume(bootstrap: str, topic: str, n: int, loads: Callable[[bytes], Any] = json.loads) -> float:
    """Seconds for kafka-python to read ``n`` records and ``loads`` each (no group)."""
    c = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, max_poll_records=1000
    )
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    got = 0
    t0 = time.perf_counter()
    while got < n:
        for msgs in c.poll(timeout_ms=500).values():
            for m in msgs:
                loads(m.value)
            got += len(msgs)
    dt = time.perf_counter() - t0
    c.close()
    return dt


def engine_only(refs: list[bytes], raws: list[bytes], batch: int) -> float:
    """Seconds for the engine alone (no Kafka) over the same events and batches."""
    from stream_influence.core.engine import InfluenceEngine

    engine = InfluenceEngine(AppSettings(engine=ENGINE).engine)
    engine.add_reference(refs)
    t0 = time.perf_counter()
    for i in range(0, len(raws), batch):
        engine.process(raws[i : i + batch])
    return time.perf_counter() - t0


def run_service(bootstrap: str, topic: str, ref: str, n: int, workdir: Path) -> dict[str, float]:
    cfg = AppSettings(
        engine=ENGINE,
        kafka={
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "group_id": f"{topic}-bench",
            "reference_topic": ref,
            "quarantine_topic": f"{topic}.quarantine",
            "dead_letter_topic": f"{topic}.dead-letter",
            "session_timeout_ms": 2000,
            "heartbeat_interval_ms": 500,
        },
        checkpoint={"directory": str(workdir / "ck")},
        metrics={"enabled": False},
    )
    service = Service(cfg, install_signals=False)
    commits: list[float] = []
    first_poll: list[float] = []
    orig_metric = service._metric
    orig_step = service._step

    def metric(name: str, *args: object) -> None:
        if name == "observe_commit":
            commits.append(float(args[0]))  # type: ignore[arg-type]
        orig_metric(name, *args)

    def step() -> None:
        orig_step()
        if not first_poll and service.engine.counters.consumed:
            first_poll.append(time.perf_counter())

    service._metric = metric  # type: ignore[method-assign]
    service._step = step  # type: ignore[method-assign]
    thread = threading.Thread(target=service.run, daemon=True)
    cpu0 = time.process_time()
    thread.start()
    while service.engine.counters.consumed < n:
        time.sleep(0.01)
    t_done = time.perf_counter()
    service.request_stop("benchmark done")
    thread.join(60)
    t_stop = time.perf_counter()  # includes the final flush, checkpoint and commit
    cpu = time.process_time() - cpu0
    start = first_poll[0] if first_poll else t_done
    summary = service.engine.summary()
    return {
        "seconds": t_stop - start,
        "seconds_to_last_event": t_done - start,
        "cpu_seconds": cpu,
        "p50_poll_to_commit_s": float(np.percentile(commits, 50)) if commits else float("nan"),
        "p99_poll_to_commit_s": float(np.percentile(commits, 99)) if commits else float("nan"),
        "batches": float(service.batches),
        "quarantined": float(summary.quarantined),
        "accepted": float(summary.accepted),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    n = args.events
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker().start()
        try:
            topic = fresh_topic(broker, "bench")
            ref = fresh_topic(broker, "bench-ref")
            refs = events(300, d=D, k=K, seed=1, prefix="ref")[0]
            produce(broker.bootstrap, ref, refs)
            raws, _ = events(n, d=D, k=K, noise=0.3, seed=2)
            t0 = time.perf_counter()
            produce(broker.bootstrap, topic, raws)
            produce_s = time.perf_counter() - t0
            json_s, orjson_s = [], []
            for _ in range(2):  # alternate, so both baselines see the same machine state
                json_s.append(raw_consume(broker.bootstrap, topic, n, json.loads))
                orjson_s.append(raw_consume(broker.bootstrap, topic, n, orjson.loads))
            raw_s, raw_or_s = min(json_s), min(orjson_s)
            svc = run_service(broker.bootstrap, topic, ref, n, Path(tmp))
            engine_s = engine_only(refs, raws, AppSettings().kafka.process_batch_size)
        finally:
            broker.stop()
    raw_rate = n / raw_s
    svc_rate = n / svc["seconds"]
    result = {
        "events": n,
        "event_bytes": int(np.mean([len(r) for r in raws])),
        "produce_rate": n / produce_s,
        "raw_consume_json_rate": raw_rate,
        "service_rate": svc_rate,
        "ratio": svc_rate / raw_rate,
        "raw_consume_orjson_rate": n / raw_or_s,
        "ratio_orjson": svc_rate / (n / raw_or_s),
        "engine_only_rate": n / engine_s,
        "service_vs_engine": svc_rate / (n / engine_s),
        **svc,
    }
    print(json.dumps(result, indent=2))
    if args.write_docs:
        write_docs(result)
    return 0


def write_docs(r: dict[str, float]) -> None:

    def verdict(x: float) -> str:
        return "meets the target" if x >= 0.5 else "misses the target"

    both = r["ratio"] >= 0.5 and r["ratio_orjson"] >= 0.5
    neither = r["ratio"] < 0.5 and r["ratio_orjson"] < 0.5
    summary = (
        "met against both baselines"
        if both
        else "missed against both baselines"
        if neither
        else "met against the issue's `json.loads` baseline, missed against the `orjson.loads` one"
        if r["ratio"] >= 0.5
        else "met against the `orjson.loads` baseline, missed against the issue's `json.loads` one"
    )
    section = f"""## service

`nice .venv/bin/python benchmarks/service.py --events {r["events"]} --write-docs`
({platform.machine()}, {os.cpu_count()} CPUs, no other benchmark running; Python {platform.python_version()},
kafka-python with crc32c, local Tansu broker; one input partition; d={D}, K={K}, ~{r["event_bytes"]} bytes
per event, 30 % label noise, 300 clean reference events; engine defaults with the class list and width
configured; default `kafka`/`checkpoint` settings: batches of 512, checkpoint every 10 000 events or 30 s).

The issue's baseline is the raw kafka-python consume + `json.loads`; the engine now decodes with
`orjson`, so a second baseline, raw consume + `orjson.loads`, is measured in the same run (each
baseline twice, alternating; the faster run of each is kept).

| measured in the same run | events/s |
|---|---|
| raw kafka-python consume + `json.loads` (the issue's baseline) | {r["raw_consume_json_rate"]:,.0f} |
| raw kafka-python consume + `orjson.loads` (the engine's decoder) | {r["raw_consume_orjson_rate"]:,.0f} |
| **service end to end** (poll → decode → score → route → learn → produce outputs → checkpoint → commit) | **{r["service_rate"]:,.0f}** |
| ratio service / `json.loads` baseline | **{r["ratio"]:.0%}** (target ≥ 50 %: {verdict(r["ratio"])}) |
| ratio service / `orjson.loads` baseline | **{r["ratio_orjson"]:.0%}** (target ≥ 50 %: {verdict(r["ratio_orjson"])}) |
| engine alone, same events and batches, no Kafka (`InfluenceEngine.process`) | {r["engine_only_rate"]:,.0f} |
| ratio service / engine alone | {r["service_vs_engine"]:.0%} |
| test producer (for reference; loads the topic before the run) | {r["produce_rate"]:,.0f} |

Poll → commit per batch: p50 {r["p50_poll_to_commit_s"] * 1000:.0f} ms, p99 {r["p99_poll_to_commit_s"] * 1000:.0f} ms
({r["batches"]:.0f} batches; a batch waits for the next checkpoint, so this is dominated by
`checkpoint.every_events` / `every_seconds`, not by processing).  The service used
{r["cpu_seconds"]:.1f} CPU-seconds (all threads of the process, the group join before the clock starts included) for {r["seconds"]:.1f} s of wall time;
{r["quarantined"]:.0f} events were quarantined and produced to the quarantine topic.

**Verdict: the ≥ 50 % target is {summary}.**  Where the time goes (cProfile of the
service thread, 50 000 events of the same stream, run separately; the profiler inflates code made of
many small Python calls, so read the shares as rough): producing the ~30 % quarantined events with
their headers is the largest part (kafka-python's `send` ≈ 30 % of the thread: record-batch append,
size estimate, partitioner), then `engine.process` ≈ 28 % (about half of it `decode_batch` —
validation and building the arrays; `orjson.loads` itself is ≈ 2 %), then kafka-python's fetch and
record unpacking inside `poll` ≈ 17 %; the service's own code (quarantine headers, metrics, the
loop, five checkpoints of ≈ 13 ms) is ≈ 7 %, and a one-off group join (≈ 1 s, before the first
event, outside the benchmark's clock) is the rest.  No cheap win is left in `service.py` /
`kafka_io.py`; the baselines do neither the engine's work nor any producing, so the levers are the
Python Kafka client (confluent-kafka reads ~1 M/s and writes ~600 k/s on these machines, see the
test-broker notes) and the engine's per-event validation.
"""
    write_section("service", section)


if __name__ == "__main__":
    sys.exit(main())
