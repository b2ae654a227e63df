"""Where the service's loop thread spends its time, per event: a stage breakdown of
``stream-influence run`` on the kafka-python backend (issue 11's profile), beside the engine alone
and the raw kafka-python consume + ``json.loads`` baseline measured in the same run.

    nice .venv/bin/python benchmarks/service_stages.py [--events 50000] [--write-docs]

One fresh embedded broker; N events (d=64, K=10, 30 % label noise, ~640 bytes) and 300 clean
reference events; the service in-process on the loop thread with default settings, reading the
topic from the beginning.  Each stage is timed around the call that does it (wall clock and the
loop thread's own CPU time, ``time.thread_time``), per consumed event:

- consume: ``BrokerConsumer.poll`` — kafka-python's fetch (``KafkaConsumer.poll``) and the rest
  of the backend's poll (handing the records to the loop);
- engine: ``InfluenceEngine.process`` — of which decode (``InfluenceEngine.decode``);
- emit: ``Emitter.emit`` (building the output records) — of which queueing them
  (``BrokerProducer.produce_many``: kafka-python's accumulator, or its ``send``);
- checkpoint: flush (``BrokerProducer.flush``), the checkpoint (serialise + write, on whichever
  thread writes it), commit (``BrokerConsumer.commit``);
- loop: the loop thread's time not inside any stage above (buffering, chunking, metrics, logs).

The timers cost ~1 µs per call they wrap (none is per record), so the shares are
close to a run without them; the ``service`` benchmark's rates are the ones without timers.
Writes the ``service_stages`` section of docs/benchmarks.md with ``--write-docs``.
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
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docs_section import write_section  # noqa: E402
from kafka import KafkaConsumer, TopicPartition  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from stream_influence.config import AppSettings  # noqa: E402
from stream_influence.core.engine import InfluenceEngine  # noqa: E402
from stream_influence.io.kafka_python import KafkaPythonBroker  # noqa: E402
from stream_influence.service.loop import Service  # noqa: E402
from tests.fixtures.broker import Broker, fresh_topic  # noqa: E402
from tests.fixtures.service_events import events, produce  # noqa: E402

D, K = 64, 10
ENGINE = {"schema": {"classes": list(range(K)), "n_features": D}}
STAGES = ("fetch", "consume", "decode", "engine", "send", "emit", "flush", "save", "commit", "step")


class Timers:
    """Wall and thread-CPU seconds and call counts per stage name."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.on = False

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        wall, cpu, calls = self.wall, self.cpu, self.calls
        pc, tt = time.perf_counter, time.thread_time

        def timed(*a: Any, **kw: Any) -> Any:
            if not self.on:
                return fn(*a, **kw)
            w0, c0 = pc(), tt()
            try:
                return fn(*a, **kw)
            finally:
                wall[name] += pc() - w0
                cpu[name] += tt() - c0
                calls[name] += 1

        return timed


class TimedBroker(KafkaPythonBroker):
    """The kafka-python backend with its clients' calls timed."""

    def __init__(self, k: Any, timers: Timers) -> None:
        super().__init__(k)
        self.t = timers

    def consumer(self, *, group: bool = True) -> Any:
        c = super().consumer(group=group)
        if group:
            c.client.poll = self.t.wrap("fetch", c.client.poll)
            c.poll = self.t.wrap("consume", c.poll)
            c.commit = self.t.wrap("commit", c.commit)
        return c

    def producer(self) -> Any:
        p = super().producer()
        # The producer's own entry point: wrapping the client's send would bypass its batched path.
        p.produce_many = self.t.wrap("send", p.produce_many)
        p.flush = self.t.wrap("flush", p.flush)
        return p


def raw_consume(bootstrap: str, topic: str, n: int) -> float:
    """Seconds for kafka-python to read ``n`` records and ``json.loads`` each (no group)."""
    c = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, max_poll_records=1000
    )
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    got, t0 = 0, None
    while got < n:
        for msgs in c.poll(timeout_ms=500).values():
            t0 = t0 or time.perf_counter()
            for m in msgs:
                json.loads(m.value)
            got += len(msgs)
    dt = time.perf_counter() - (t0 or 0.0)
    c.close()
    return dt


def engine_only(refs: list[bytes], raws: list[bytes], batch: int) -> float:
    """Wall seconds of the engine alone over the same events, cold as the service starts, with
    BLAS at the service's ``blas_threads`` (the libraries' default made it several times slower)."""
    engine = InfluenceEngine(AppSettings(engine=ENGINE).engine)
    engine.add_reference(refs)
    with threadpool_limits(limits=AppSettings().blas_threads or os.cpu_count(), user_api="blas"):
        t0 = time.perf_counter()
        for i in range(0, len(raws), batch):
            engine.process(raws[i : i + batch])
        return time.perf_counter() - t0


def run_service(bootstrap: str, topic: str, ref: str, n: int, workdir: Path) -> dict[str, Any]:
    cfg = AppSettings(
        engine=ENGINE,
        kafka={
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "group_id": f"{topic}-stages",
            "reference_topic": ref,
            "quarantine_topic": f"{topic}.quarantine",
            "dead_letter_topic": f"{topic}.dead-letter",
            "session_timeout_ms": 2000,
            "heartbeat_interval_ms": 500,
        },
        checkpoint={"directory": str(workdir / "ck")},
        metrics={"enabled": False},
    )
    t = Timers()
    service = Service(cfg, install_signals=False, broker=TimedBroker(cfg.kafka, t))
    orig = (InfluenceEngine.process, InfluenceEngine.decode)
    InfluenceEngine.process = t.wrap("engine", InfluenceEngine.process)  # type: ignore[method-assign]
    InfluenceEngine.decode = t.wrap("decode", InfluenceEngine.decode)  # type: ignore[method-assign]
    service.emitter.emit = t.wrap("emit", service.emitter.emit)  # type: ignore[method-assign]
    service.store.save = t.wrap("save", service.store.save)  # type: ignore[method-assign]
    step = t.wrap("step", service._step)
    box: dict[str, float] = {}

    def timed_step() -> None:
        # The clock starts with the first processed batch (the group join is not the loop's work).
        if "first" not in box and service.engine.counters.consumed:  # once: not again after the end
            t.on = True
            box["first"] = service.engine.counters.consumed
        step()
        if service.engine.counters.consumed >= n:
            t.on = False  # the shutdown (final checkpoint, leaving the group) is not the stream's work

    service._step = timed_step  # type: ignore[method-assign]
    thread = threading.Thread(target=service.run, daemon=True)
    try:
        thread.start()
        while service.engine.counters.consumed < n:
            time.sleep(0.01)
        service.request_stop("benchmark done")
        thread.join(120)
    finally:
        InfluenceEngine.process, InfluenceEngine.decode = orig  # type: ignore[method-assign]
    consumed = service.engine.counters.consumed - box.get("first", 0)
    return {
        "wall": dict(t.wall),
        "cpu": dict(t.cpu),
        "calls": dict(t.calls),
        "events": consumed,
        "quarantined": service.engine.counters.quarantined,
        "batches": service.batches,
    }


def paced_latency(
    bootstrap: str, ref: str, raws: list[bytes], rate: float, seconds: float, workdir: Path
) -> dict[str, float]:
    """p50/p99/max poll→commit of a caught-up service (default settings) offered ``rate``
    events/s for ``seconds`` by a paced producer (confluent-kafka, so the load generator does
    not compete with the service for the interpreter)."""
    import numpy as np
    from confluent_kafka import Producer

    topic = f"latency-{time.time_ns()}"
    cfg = AppSettings(
        engine=ENGINE,
        kafka={
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "group_id": f"{topic}-g",
            "reference_topic": ref,
            "quarantine_topic": f"{topic}.quarantine",
            "dead_letter_topic": f"{topic}.dead-letter",
            "session_timeout_ms": 2000,
            "heartbeat_interval_ms": 500,
        },
        checkpoint={"directory": str(workdir / f"ck-{topic}")},
        metrics={"enabled": False},
    )
    from stream_influence.io.kafka_python import ensure_topics

    ensure_topics(cfg.kafka, [topic])
    service = Service(cfg, install_signals=False)
    commits: list[tuple[float, float]] = []
    orig = service._metric

    def metric(name: str, *args: Any) -> None:
        if name == "observe_commit":
            commits.append((time.perf_counter(), float(args[0])))
        orig(name, *args)

    service._metric = metric  # type: ignore[method-assign]
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not service.owned and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "acks": "1"})
    n = int(rate * seconds)
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    t0 = time.perf_counter()
    sent = 0
    while sent < n:
        due = t0 + (sent // per_tick) * tick
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        for v in raws[sent % len(raws) : sent % len(raws) + per_tick]:
            p.produce(topic, v)
        sent += per_tick
        p.poll(0)
    p.flush(30)
    offered = sent / (time.perf_counter() - t0)
    deadline = time.monotonic() + 120
    while service.engine.counters.consumed < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    service.request_stop("benchmark done")
    thread.join(120)
    lat = [x for when, x in commits if when >= t0]
    return {
        "offered_rate": offered,
        "consumed": float(service.engine.counters.consumed),
        "commits": float(len(lat)),
        "p50_ms": float(np.percentile(lat, 50)) * 1e3 if lat else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) * 1e3 if lat else float("nan"),
        "max_ms": float(max(lat)) * 1e3 if lat else float("nan"),
    }


def breakdown(r: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(stage, wall µs/event, CPU µs/event) with nested stages made exclusive."""
    n = r["events"]
    out = []
    for kind in ("wall", "cpu"):
        s = defaultdict(float, r[kind])
        # A checkpoint's flush and save run inside the step, as do consume, engine and emit.
        excl = {
            "consume: kafka-python fetch (KafkaConsumer.poll)": s["fetch"],
            "consume: backend poll around it (records to the loop)": s["consume"] - s["fetch"],
            "engine: decode": s["decode"],
            "engine: score, route, learn": s["engine"] - s["decode"],
            "emit: building the output records": s["emit"] - s["send"],
            "emit: queueing them (produce_many)": s["send"],
            "checkpoint: flush": s["flush"],
            "checkpoint: serialise + write": s["save"],
            "checkpoint: commit": s["commit"],
        }
        excl["loop: everything else on the loop thread"] = s["step"] - sum(
            s[k] for k in ("consume", "engine", "emit", "flush", "save", "commit")
        )
        excl["total loop thread"] = s["step"]
        r[f"{kind}_excl"] = excl
    for name in r["wall_excl"]:
        out.append((name, r["wall_excl"][name] / n * 1e6, r["cpu_excl"][name] / n * 1e6))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument(
        "--rates", default="10000,3000", help="offered events/s of the latency phases, comma-separated"
    )
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the latency phase (0: none)")
    ap.add_argument("--json-out", type=Path, help="also write the result as JSON here")
    ap.add_argument(
        "--before", type=Path, help="a --json-out of the same command on the code before, shown beside"
    )
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    n = args.events
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker().start()
        try:
            topic = fresh_topic(broker, "stages")
            ref = fresh_topic(broker, "stages-ref")
            refs = events(300, d=D, k=K, seed=1, prefix="ref")[0]
            produce(broker.bootstrap, ref, refs)
            raws, _ = events(n, d=D, k=K, noise=0.3, seed=2)
            produce(broker.bootstrap, topic, raws)
            raw_s = raw_consume(broker.bootstrap, topic, n)
            r = run_service(broker.bootstrap, topic, ref, n, Path(tmp))
            engine_s = engine_only(refs, raws, AppSettings().kafka.process_batch_size)
            latency = {
                rate: paced_latency(broker.bootstrap, ref, raws, float(rate), args.seconds, Path(tmp))
                for rate in args.rates.split(",")
                if rate and args.seconds > 0
            }
        finally:
            broker.stop()
    rows = breakdown(r)
    total_wall = r["wall_excl"]["total loop thread"]
    result = {
        "events": r["events"],
        "load_before": load0,
        "load_after": os.getloadavg()[0],
        "raw_consume_json_rate": n / raw_s,
        "engine_only_rate": n / engine_s,
        "service_loop_rate": r["events"] / total_wall,
        "quarantined": r["quarantined"],
        "batches": r["batches"],
        "sends": r["calls"].get("send", 0),
        "checkpoints": r["calls"].get("save", 0),
        # Wall ms per call of the checkpoint's steps on the loop thread.
        "per_checkpoint_ms": {
            k: r["wall"].get(k, 0.0) / max(1, r["calls"].get(k, 0)) * 1e3 for k in ("flush", "save", "commit")
        },
        "latency": latency,
        "stages_us_per_event": {name: {"wall": w, "cpu": c} for name, w, c in rows},
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    if args.write_docs:
        before = json.loads(args.before.read_text()) if args.before else None
        write_docs(result, n, args, before)
    return 0


def write_docs(r: dict[str, Any], n: int, args: argparse.Namespace, before: dict[str, Any] | None) -> None:
    stages = r["stages_us_per_event"]
    total = stages["total loop thread"]["wall"]
    b = before["stages_us_per_event"] if before else None

    def cell(v: dict[str, float] | None) -> str:
        return f"{v['wall']:.1f} / {v['cpu']:.1f}" if v else "–"

    lines = [
        f"| {name} | {cell(b.get(name) if b else None)} | {cell(v)} | {v['wall'] / total:.0%} |"
        for name, v in stages.items()
    ]
    lat_rows = []
    for rate, lat in r["latency"].items():
        old = (before or {}).get("latency", {}).get(rate)
        was = f"{old['p50_ms']:.0f} / {old['p99_ms']:.0f} / {old['max_ms']:.0f}" if old else "–"
        lat_rows.append(
            f"| {lat['offered_rate']:,.0f} | {was} | {lat['p50_ms']:.0f} / {lat['p99_ms']:.0f} / {lat['max_ms']:.0f} "
            f"| {lat['commits']:.0f} |"
        )
    table, lat_table = "\n".join(lines), "\n".join(lat_rows)
    cmd = f"nice .venv/bin/python benchmarks/service_stages.py --events {n} --rates {args.rates} --seconds {args.seconds:g}"
    rates = f"raw kafka-python consume + `json.loads` {r['raw_consume_json_rate']:,.0f} events/s; engine alone {r['engine_only_rate']:,.0f} events/s; the service's loop thread {r['service_loop_rate']:,.0f} events/s"
    was = ""
    if before:
        was = (
            f"  Before (same command on the code before, run just before on the same machine): raw "
            f"{before['raw_consume_json_rate']:,.0f}, engine alone {before['engine_only_rate']:,.0f}, loop thread "
            f"{before['service_loop_rate']:,.0f} events/s, {before['checkpoints']} checkpoints."
        )
    pc = r["per_checkpoint_ms"]
    lat10 = r["latency"].get("10000")
    met = lat10 is not None and lat10["p99_ms"] <= 100
    top_rate = max((float(k) for k in r["latency"]), default=0.0)
    verdict = (
        f"**Verdict: p99 poll → commit ≤ 100 ms at 10k events/s is {'met' if met else 'missed'} in this run.**  "
        f"Before, a batch's offsets waited for the next checkpoint (every 10 000 events or 30 s): about one "
        f"second at 10k events/s, up to 30 s on a slower stream.  Now a checkpoint starts every 50 ms (or "
        f"when the previous write is done) and its files are written on the writer thread; on the loop thread "
        f"one costs a flush ({pc['flush']:.1f} ms wall), the serialisation ({pc['save']:.1f} ms wall including "
        f"handing it over) and a synchronous commit ({pc['commit']:.1f} ms wall), and a second flush before the "
        f"commit.  "
        + (
            f"Where p99 stays above 100 ms the loop thread fell behind the offered rate: under this load "
            f"it ran at {r['service_loop_rate']:,.0f} events/s with the engine alone at "
            f"{r['engine_only_rate']:,.0f} events/s, so the backlog, not the checkpoint cadence, sets the tail."
            if r["service_loop_rate"] < top_rate
            else f"The loop thread ran at {r['service_loop_rate']:,.0f} events/s (engine alone "
            f"{r['engine_only_rate']:,.0f}), above the offered {top_rate:,.0f}, so a backlog does not explain "
            "the tail; these stage timers do not say what does."
        )
    )
    load_note = (
        " — other work shared the cores, so the absolute rates are low and noisy; read the shares and the ratios"
        if max(r["load_before"], r["load_after"]) > 0.5 * (os.cpu_count() or 1)
        else ""
    )
    section = f"""## service_stages: service throughput (kafka-python) — where the loop thread's time goes, and poll → commit

`{cmd} --write-docs` ({platform.machine()}, {os.cpu_count()} CPUs, 1-min load average {r["load_before"]:.1f}
before and {r["load_after"]:.1f} after{load_note}; Python {platform.python_version()}, kafka-python with crc32c,
local Tansu broker, one input partition, d={D}, K={K}, 30 % label noise, 300 clean reference events,
default settings).  The `service` section (benchmarks/service.py) has the end-to-end ratios on both
backends; this one splits the kafka-python loop thread into stages and measures poll → commit.

**Stages**, µs per consumed event (wall / the loop thread's own CPU), from the first processed batch to
the step that consumed the last of {n} events:

| stage | before | after | share of the loop thread's wall time (after) |
|---|---|---|---|
{table}

Same run: {rates}; {r["quarantined"]} events quarantined ({r["sends"]} `produce_many` calls), {r["batches"]}
batches, {r["checkpoints"]} checkpoints.{was}

**Poll → commit** (p50 / p99 / max ms over the batches of a caught-up service offered a paced stream
for {args.seconds:g} s by a confluent-kafka producer; the time from the poll that delivered a batch to
the offset commit that covers it):

| offered events/s | before | after | batches |
|---|---|---|---|
{lat_table}

{verdict}
"""
    write_section("service_stages", section)


if __name__ == "__main__":
    sys.exit(main())
