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

Then poll → commit: a caught-up service offered a paced stream (``--rates``, ``--seconds``), with
the :class:`Timeline` of every batch (polled → chunk processed → checkpoint captured → written on
the writer thread → noticed by the loop → commit sent → acknowledged) and what could stall it (gc
collections, polls past their timeout, fsyncs); and the fetch hold of the broker itself: a raw
kafka-python consumer's produce → poll delay at each ``--fetch-waits`` ``fetch_max_wait_ms``.

Writes the ``service_stages`` section of docs/benchmarks.md with ``--write-docs`` (``--before``: a
``--json-out`` of the same command on the code before, shown beside).
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


class Timeline:
    """Timestamps (``time.monotonic``) of every batch and every checkpoint of a paced run, and of
    what could stall them: each poll, each gc collection, each fsync on the writer thread.

    A batch's poll → commit splits into: poll → processed (buffered, then decoded, scored,
    learned, outputs queued); processed → capture (waiting for the next checkpoint: its cadence,
    or the previous write still running); capture (flush + serialisation on the loop thread);
    write (on the writer thread: files, fsyncs, manifest); write done → noticed (the loop was
    busy — in a poll, a chunk — when the write ended); noticed → commit sent (the second flush);
    commit (the synchronous commit round trip)."""

    def __init__(self) -> None:
        self.processed: dict[float, tuple[float, float]] = {}  # t_poll → its last chunk's start, end
        self.checkpoints: list[dict[str, Any]] = []
        self.polls: list[tuple[float, float, int, int]] = []  # start, end, timeout ms, records
        self.gcs: list[tuple[float, float, int]] = []  # start, end, generation (loop or any thread)
        self.fsyncs: list[tuple[float, float]] = []
        self.writes: dict[str, tuple[float, float, float]] = {}  # path → start, end, thread CPU
        self._gc0: float | None = None
        self.on = False

    def gc_callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc0 = time.monotonic()
        elif self._gc0 is not None and self.on:
            self.gcs.append((self._gc0, time.monotonic(), int(info.get("generation", -1))))

    def install(self, service: Service) -> Callable[[], None]:
        """Wrap the service's steps; returns a function that undoes the global patches."""
        import gc

        mono = time.monotonic
        process, capture, committed = (
            service._process,
            service._checkpoint_in_background,
            service._committed_write,
        )
        write = service.store._write

        def timed_process(tp: Any, msgs: Any, t_poll: float) -> None:
            t0 = mono()
            process(tp, msgs, t_poll)
            self.processed[t_poll] = (t0, mono())

        def timed_capture() -> None:
            t0 = mono()
            capture()
            w = service.writing
            if w is not None and self.on:
                self.checkpoints.append(
                    {"capture": t0, "captured": mono(), "polls": list(w.polls), "path": str(w.pending.path)}
                )

        def timed_write(path: Path, *a: Any) -> Path:
            t0, c0 = mono(), time.thread_time()
            try:
                return write(path, *a)
            finally:
                self.writes[str(path)] = (t0, mono(), time.thread_time() - c0)

        def timed_committed() -> None:
            w = service.writing
            t0 = mono()
            committed()
            for ck in reversed(self.checkpoints):
                if w is not None and ck["path"] == str(w.pending.path):
                    ck["noticed"], ck["done"] = t0, mono()
                    ck["commit"] = getattr(self, "_last_commit", None)
                    break

        service._process = timed_process  # type: ignore[method-assign]
        service._checkpoint_in_background = timed_capture  # type: ignore[method-assign]
        service._committed_write = timed_committed  # type: ignore[method-assign]
        service.store._write = timed_write  # type: ignore[method-assign]
        fsync = os.fsync

        def timed_fsync(fd: int) -> None:
            t0 = mono()
            fsync(fd)
            if self.on and threading.current_thread().name.startswith("checkpoint-writer"):
                self.fsyncs.append((t0, mono()))

        os.fsync = timed_fsync
        gc.callbacks.append(self.gc_callback)

        def undo() -> None:
            os.fsync = fsync
            gc.callbacks.remove(self.gc_callback)

        return undo

    def wrap_consumer(self, c: Any) -> Any:
        poll, commit = c.poll, c.commit

        def timed_poll(timeout_ms: int, max_records: int) -> Any:
            t0 = time.monotonic()
            out = poll(timeout_ms, max_records)
            if self.on:
                self.polls.append((t0, time.monotonic(), timeout_ms, sum(len(v) for v in out.values())))
            return out

        def timed_commit(*a: Any, **kw: Any) -> Any:
            t0 = time.monotonic()
            try:
                return commit(*a, **kw)
            finally:
                self._last_commit = (t0, time.monotonic())

        c.poll, c.commit = timed_poll, timed_commit
        return c

    def batches(self) -> list[dict[str, float]]:
        """One row per committed batch: its latency and where it went (ms)."""
        rows = []
        for ck in self.checkpoints:
            if "done" not in ck or ck.get("commit") is None or ck["path"] not in self.writes:
                continue
            w0, w1, wcpu = self.writes[ck["path"]]
            c0, c1 = ck["commit"]
            if not ck["noticed"] <= c0 <= ck["done"]:
                continue  # the commit failed or was skipped: covered by a later checkpoint
            fs = sum(b - a for a, b in self.fsyncs if w0 <= a <= w1)
            for t_poll in ck["polls"]:
                if t_poll not in self.processed:
                    continue
                p0, p = self.processed[t_poll]
                if p > ck["capture"]:
                    continue
                # Was the previous checkpoint's write still running when this batch was ready?
                prev = [
                    x for x in self.checkpoints if x["capture"] < ck["capture"] and x["path"] in self.writes
                ]
                prev_end = self.writes[prev[-1]["path"]][1] if prev else p
                span = (t_poll, c1)
                rows.append(
                    {
                        "total": c1 - t_poll,
                        "poll → chunk starts (buffered, earlier chunks, rest of the step)": p0 - t_poll,
                        "chunk: decode, score, learn, emit": p - p0,
                        "processed → capture: previous write still running": max(
                            0.0, min(prev_end, ck["capture"]) - p
                        ),
                        "processed → capture: waiting for the cadence": ck["capture"]
                        - max(p, min(prev_end, ck["capture"])),
                        "capture: flush + serialise (loop thread)": ck["captured"] - ck["capture"],
                        "write: handed over → writer starts": w0 - ck["captured"],
                        "write: fsyncs": fs,
                        "write: the rest (file, sha256, manifest, prune)": (w1 - w0) - fs,
                        "write done → loop notices": ck["noticed"] - w1,
                        "noticed → commit sent (second flush)": c0 - ck["noticed"],
                        "commit round trip": c1 - c0,
                        "gc pauses inside": sum(
                            min(b, span[1]) - max(a, span[0])
                            for a, b, _ in self.gcs
                            if b > span[0] and a < span[1]
                        ),
                        "polls past their timeout inside": sum(
                            (b - a) - t / 1e3
                            for a, b, t, _ in self.polls
                            if a >= span[0] and b <= span[1] and (b - a) > t / 1e3
                        ),
                        "writer CPU (thread time)": wcpu,
                    }
                )
        return rows

    def split(self) -> dict[str, dict[str, float]]:
        """Mean split (ms) of the median batches (49th–51st percentile) and of the slowest 1 %."""
        import numpy as np

        rows = sorted(self.batches(), key=lambda r: r["total"])
        if not rows:
            return {}
        n = len(rows)
        groups = {
            "p50": rows[int(n * 0.49) : max(int(n * 0.51), int(n * 0.49) + 1)],
            "p99": rows[min(n - 1, int(n * 0.99)) :],
        }
        out = {}
        for g, rs in groups.items():
            out[g] = {k: float(np.mean([r[k] for r in rs])) * 1e3 for k in rs[0]}
            out[g]["batches"] = float(len(rs))
        poll_over = [(b - a) * 1e3 - t for a, b, t, _ in self.polls]
        out["stalls"] = {
            "polls": float(len(self.polls)),
            "poll overrun p99 ms": float(np.percentile(poll_over, 99)) if poll_over else 0.0,
            "poll overrun max ms": float(max(poll_over, default=0.0)),
            "gc collections": float(len(self.gcs)),
            "gc gen2": float(sum(1 for *_, g in self.gcs if g == 2)),
            "gc max ms": float(max(((b - a) * 1e3 for a, b, _ in self.gcs), default=0.0)),
            "fsync p99 ms": float(np.percentile([(b - a) * 1e3 for a, b in self.fsyncs], 99))
            if self.fsyncs
            else 0.0,
            "fsync max ms": float(max(((b - a) * 1e3 for a, b in self.fsyncs), default=0.0)),
            "write p50 ms": float(np.percentile([(b - a) * 1e3 for a, b, _ in self.writes.values()], 50))
            if self.writes
            else 0.0,
            "write max ms": float(max(((b - a) * 1e3 for a, b, _ in self.writes.values()), default=0.0)),
        }
        return out


class TimelineBroker(KafkaPythonBroker):
    """The kafka-python backend whose group consumer reports polls and commits to a timeline."""

    def __init__(self, k: Any, timeline: Timeline) -> None:
        super().__init__(k)
        self.timeline = timeline

    def consumer(self, *, group: bool = True) -> Any:
        c = super().consumer(group=group)
        return self.timeline.wrap_consumer(c) if group else c


def paced_latency(
    bootstrap: str, ref: str, raws: list[bytes], rate: float, seconds: float, workdir: Path
) -> dict[str, Any]:
    """p50/p99/max poll→commit of a caught-up service (default settings) offered ``rate``
    events/s for ``seconds`` by a paced producer (confluent-kafka, so the load generator does
    not compete with the service for the interpreter), with the :class:`Timeline` split."""
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
    tl = Timeline()
    service = Service(cfg, install_signals=False, broker=TimelineBroker(cfg.kafka, tl))
    undo = tl.install(service)
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
    tl.on = True
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
    tl.on = False
    service.request_stop("benchmark done")
    thread.join(120)
    undo()
    lat = [x for when, x in commits if when >= t0]
    return {
        "offered_rate": offered,
        "consumed": float(service.engine.counters.consumed),
        "commits": float(len(lat)),
        "p50_ms": float(np.percentile(lat, 50)) * 1e3 if lat else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) * 1e3 if lat else float("nan"),
        "max_ms": float(max(lat)) * 1e3 if lat else float("nan"),
        "timeline": tl.split(),
    }


def fetch_hold(
    bootstrap: str, raws: list[bytes], rate: float, seconds: float, wait_ms: int
) -> dict[str, float]:
    """Produce → poll delay (p50/p99/max ms) of a raw kafka-python consumer with
    ``fetch_max_wait_ms=wait_ms`` reading a paced stream (no service): how long the broker holds
    a fetch while records arrive.  Apache Kafka answers a waiting fetch once ``fetch_min_bytes``
    (1) are there; a broker that holds it longer delays every caught-up consumer."""
    import numpy as np
    from confluent_kafka import Producer

    topic = f"fetch-{wait_ms}-{time.time_ns()}"
    from stream_influence.io.kafka_python import ensure_topics

    ensure_topics(AppSettings(kafka={"bootstrap_servers": bootstrap}).kafka, [topic])
    c = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, fetch_max_wait_ms=wait_ms
    )
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    c.poll(timeout_ms=100)
    stop = threading.Event()

    def paced() -> None:
        p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "acks": "1"})
        t0, sent, per_tick = time.perf_counter(), 0, max(1, round(rate * 0.01))
        while not stop.is_set():
            due = t0 + sent / rate
            if due > time.perf_counter():
                time.sleep(due - time.perf_counter())
            for v in raws[:per_tick]:
                p.produce(topic, v)  # timestamp: the time of this call (CreateTime)
            sent += per_tick
            p.poll(0)
        p.flush(10)

    thread = threading.Thread(target=paced, daemon=True)
    thread.start()
    delays: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for msgs in c.poll(timeout_ms=500, max_records=512).values():
            now = time.time() * 1e3
            delays.extend(now - m.timestamp for m in msgs)
    stop.set()
    thread.join(30)
    while c.poll(timeout_ms=200):  # the rest of the stream: the topic is idle from here on
        pass
    # What the setting costs an idle consumer: the CPU its polling thread spends on empty fetches.
    cpu0, wall0 = time.thread_time(), time.monotonic()
    while time.monotonic() - wall0 < 3.0:
        c.poll(timeout_ms=500)
    idle = (time.thread_time() - cpu0) / (time.monotonic() - wall0)
    c.close()
    return {
        "p50_ms": float(np.percentile(delays, 50)),
        "p99_ms": float(np.percentile(delays, 99)),
        "max_ms": float(max(delays)),
        "idle_cpu_percent": 100 * idle,
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
    ap.add_argument(
        "--fetch-waits",
        default="500,20",
        help="fetch_max_wait_ms values of the raw fetch-hold phase at the first rate (empty: none)",
    )
    ap.add_argument("--json-out", type=Path, help="also write the result as JSON here")
    ap.add_argument(
        "--before", type=Path, help="a --json-out of the same command on the code before, shown beside"
    )
    ap.add_argument("--label", default="", help="names the code this run measured (kept in --json-out)")
    ap.add_argument(
        "--runs",
        type=Path,
        nargs="*",
        default=[],
        help="--json-out files of repeated runs (before and after alternated) listed in the docs",
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
            top = float(args.rates.split(",")[0])
            fetch = {
                w: fetch_hold(broker.bootstrap, raws, top, min(args.seconds, 5.0), int(w))
                for w in args.fetch_waits.split(",")
                if w and args.seconds > 0
            }
        finally:
            broker.stop()
    rows = breakdown(r)
    total_wall = r["wall_excl"]["total loop thread"]
    result = {
        "label": args.label,
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
        "fetch_hold": fetch,
        "fetch_max_wait_ms": AppSettings().kafka.fetch_max_wait_ms
        if hasattr(AppSettings().kafka, "fetch_max_wait_ms")
        else 500,
        "stages_us_per_event": {name: {"wall": w, "cpu": c} for name, w, c in rows},
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    if args.write_docs:
        before = json.loads(args.before.read_text()) if args.before else None
        runs = [json.loads(f.read_text()) for f in args.runs] + (
            [result] if args.runs else []
        )  # this run last
        write_docs(result, n, args, before, runs)
    return 0


def write_docs(
    r: dict[str, Any],
    n: int,
    args: argparse.Namespace,
    before: dict[str, Any] | None,
    runs: list[dict[str, Any]],
) -> None:
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
    cmd = (
        f"nice .venv/bin/python benchmarks/service_stages.py --events {n} --rates {args.rates} "
        f"--seconds {args.seconds:g}"
    )
    rates = f"raw kafka-python consume + `json.loads` {r['raw_consume_json_rate']:,.0f} events/s; engine alone {r['engine_only_rate']:,.0f} events/s; the service's loop thread {r['service_loop_rate']:,.0f} events/s"
    was = ""
    if before:
        was = (
            f"  Before (same command on the code before, run just before on the same machine): raw "
            f"{before['raw_consume_json_rate']:,.0f}, engine alone {before['engine_only_rate']:,.0f}, loop thread "
            f"{before['service_loop_rate']:,.0f} events/s, {before['checkpoints']} checkpoints."
        )

    # Where a batch's poll → commit went, at the first (highest) rate.
    top = args.rates.split(",")[0]
    tl = r["latency"].get(top, {}).get("timeline", {})
    btl = (before or {}).get("latency", {}).get(top, {}).get("timeline", {})

    def ms(d: dict[str, Any], group: str, key: str) -> str:
        v = d.get(group, {}).get(key)
        return f"{v:.1f}" if v is not None else "–"

    split_rows = "\n".join(
        f"| {key} | {ms(btl, 'p50', key)} | {ms(btl, 'p99', key)} | {ms(tl, 'p50', key)} | {ms(tl, 'p99', key)} |"
        for key in tl.get("p50", {})
        if key != "batches"
    )
    stall_rows = "\n".join(
        f"| {key} | {ms(btl, 'stalls', key)} | {ms(tl, 'stalls', key)} |" for key in tl.get("stalls", {})
    )
    fetch_rows = "\n".join(
        f"| {w} | {f['p50_ms']:.0f} / {f['p99_ms']:.0f} / {f['max_ms']:.0f} | {f['idle_cpu_percent']:.1f} % |"
        for w, f in r.get("fetch_hold", {}).items()
    )

    def stat(d: dict[str, Any], group: str, key: str) -> float:
        return float(d.get(group, {}).get(key, float("nan")))

    lat_top = r["latency"].get(top)
    met = lat_top is not None and lat_top["p99_ms"] <= 100
    loaded = max(r["load_before"], r["load_after"])
    verdict = (
        f"**Verdict: p99 poll → commit ≤ 100 ms at {float(top):,.0f} events/s is {'met' if met else 'missed'} "
        f"in this run** ({lat_top['p99_ms']:.0f} ms"
        + (
            f"; before {before['latency'][top]['p99_ms']:.0f} ms"
            if before and top in before.get("latency", {})
            else ""
        )
        + f"), with the 1-minute load average at {r['load_before']:.1f}–{r['load_after']:.1f} on {os.cpu_count()} "
        f"cores{' (other work shared them: the tail moves with the load)' if loaded > 0.5 * (os.cpu_count() or 1) else ''}."
        if lat_top
        else "No latency phase was run."
    )
    parts = {
        k: v
        for k, v in tl.get("p99", {}).items()
        if k not in ("total", "batches", "writer CPU (thread time)")
    }
    parts = {k: v for k, v in parts.items() if "inside" not in k}  # overlapping rows
    left = ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:3])
    findings = ""
    if before and btl and tl:
        findings = f"""
What made the tail, from the timeline of every batch (the *before* columns), and what was done:

1. **Garbage collection of start-up objects.**  A full (generation 2) collection walked every
   object the process had made since it started — modules, settings, the engine — on the loop
   thread: the longest took {stat(btl, "stalls", "gc max ms"):.0f} ms before and sat inside the slowest batches
   ({ms(btl, "p99", "gc pauses inside")} ms of their time).  The service now collects and freezes
   (`gc.freeze`) what start-up made before it subscribes, and unfreezes at shutdown: longest
   collection {stat(tl, "stalls", "gc max ms"):.0f} ms after.
2. **The broker held fetches.**  A chunk's last records wait for the next fetch when the partition
   has more (offset-aligned chunks, docs/architecture.md).  kafka-python asks the broker to hold a
   fetch up to `fetch_max_wait_ms` (500 ms) until a byte arrives; Apache Kafka answers as soon as
   one does, but the embedded broker held it while records arrived — the raw consumer below saw
   produce → poll p50 {r["fetch_hold"].get("500", {}).get("p50_ms", float("nan")):.0f} ms at 500 against
   {r["fetch_hold"].get(str(r["fetch_max_wait_ms"]), {}).get("p50_ms", float("nan")):.0f} ms at {r["fetch_max_wait_ms"]}.  New setting `kafka.fetch_max_wait_ms`
   (default {r["fetch_max_wait_ms"]} ms, both backends): the slowest batches waited
   {ms(btl, "p99", "poll → chunk starts (buffered, earlier chunks, rest of the step)")} ms before their chunk started before,
   {ms(tl, "p99", "poll → chunk starts (buffered, earlier chunks, rest of the step)")} ms after.
3. **The loop noticed a finished write late.**  It looked at the write once per step, after every
   ready chunk: {ms(btl, "p99", "write done → loop notices")} ms in the slowest batches before.  Now it commits a
   durable checkpoint right after the poll and between chunks, and when it is caught up (the
   last poll returned less than `max_poll_records`) it waits for the write — at most one
   `checkpoint.every_seconds` — before it polls, so the writer thread has the interpreter to
   itself: {ms(tl, "p99", "write done → loop notices")} ms after.
4. **Small beside these:** the writer thread's CPU ({ms(btl, "p50", "writer CPU (thread time)")} ms per write: serialisation
   stays on the loop thread, sha256 and fsync release the interpreter), the second flush
   ({ms(btl, "p99", "noticed → commit sent (second flush)")} ms in the slowest batches), the synchronous commit
   ({ms(btl, "p99", "commit round trip")} ms), waiting for the previous write
   ({ms(btl, "p99", "processed → capture: previous write still running")} ms).
5. **What is left** in the slowest 1 % after: {left}.  Waiting for the next checkpoint is the
   design (up to `checkpoint.every_seconds` = 50 ms), the write is four fsyncs on a shared disk,
   and the loop thread's own speed sets the rest: on a loaded machine a chunk takes longer and a
   batch waits behind the chunks polled before it (the loop thread ran at
   {r["service_loop_rate"]:,.0f} events/s in this run's stage phase, against {float(top):,.0f} offered).
"""
    run_rows = "\n".join(
        f"| {i} | {x.get('label') or '?'} | {x['load_before']:.1f} → {x['load_after']:.1f} | "
        + " | ".join(
            f"{x['latency'][rate]['p50_ms']:.0f} / {x['latency'][rate]['p99_ms']:.0f} / {x['latency'][rate]['max_ms']:.0f}"
            if rate in x.get("latency", {})
            else "–"
            for rate in args.rates.split(",")
        )
        + f" | {x['service_loop_rate']:,.0f} |"
        for i, x in enumerate(runs, 1)
    )
    runs_table = (
        f"""
**Repeated runs** (the same command, the code before and after alternated, one after the other; the
load is the 1-minute average before → after each run; poll → commit p50 / p99 / max ms):

| run | code | load | {" | ".join(f"{float(rate):,.0f} events/s" for rate in args.rates.split(","))} | loop thread events/s |
|---|---|---|{"---|" * len(args.rates.split(","))}---|
{run_rows}
"""
        if runs
        else ""
    )
    load_note = (
        " — other work shared the cores, so the absolute rates are low and noisy; read the shares and the ratios"
        if loaded > 0.5 * (os.cpu_count() or 1)
        else ""
    )
    before_load = (
        f"; the *before* run: {before['load_before']:.1f} before and {before['load_after']:.1f} after"
        if before
        else ""
    )
    section = f"""## service_stages: service throughput (kafka-python) — where the loop thread's time goes, and poll → commit

`{cmd} --write-docs` ({platform.machine()}, {os.cpu_count()} CPUs, 1-min load average {r["load_before"]:.1f}
before and {r["load_after"]:.1f} after{before_load}{load_note}; Python {platform.python_version()}, kafka-python with crc32c,
local Tansu broker, one input partition, d={D}, K={K}, 30 % label noise, 300 clean reference events,
default settings).  The `service` section (benchmarks/service.py) has the end-to-end ratios on both
backends; this one splits the kafka-python loop thread into stages and measures poll → commit.
*Before* is the same command on the code before (`--json-out` there, `--before` here).

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

| offered events/s | before | after | batches (after) |
|---|---|---|---|
{lat_table}

{verdict}
{runs_table}
**Where a batch's time went** at {float(top):,.0f} events/s (ms; mean over the median batches — 49th to 51st
percentile — and over the slowest 1 %; every batch's timeline: when it was polled, its chunk processed,
the checkpoint that holds it captured, written on the writer thread, noticed by the loop, its commit
sent and acknowledged; the last three rows overlap the others):

| part of poll → commit | before, median | before, slowest 1 % | after, median | after, slowest 1 % |
|---|---|---|---|---|
{split_rows}

Stalls in the same phase:

| | before | after |
|---|---|---|
{stall_rows}

**Fetch hold of the broker** (a raw kafka-python consumer, no service, reading a stream paced at
{float(top):,.0f} events/s: produce → poll p50 / p99 / max ms; then the same consumer on the idle
topic for 3 s: the CPU its polling thread spends, in % of one core):

| fetch_max_wait_ms | produce → poll | idle consumer CPU |
|---|---|---|
{fetch_rows}
{findings}"""
    write_section("service_stages", section)


if __name__ == "__main__":
    sys.exit(main())
