"""Scale-out benchmark: events/s end to end with 1, 2 and 4 score workers + one updater, beside
the plainest alternative — one ``run --role all`` process — on the same topic, same machine.

    PYTHONPATH=. python benchmarks/scaleout.py [--events 40000] [--workers 1 2 4]

Each configuration gets fresh topics on one embedded broker (Tansu), the whole stream produced
before the processes start (a backlog, so the rate is what the processes sustain, not what the
producer offers).  The rate is measured over the middle of the run: between the moments the
(updater's or single process's) checkpoints show 10 % and 100 % of the valid events learned.
The scaling model's inputs are measured in-process: a worker's scoring rate (decode + score +
route, :meth:`InfluenceEngine.score_events`), the updater's learning rate
(:meth:`InfluenceEngine.learn_events`), the snapshot's size and its encode + verify-decode time.
Results: the ``scaleout`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_section import write_section  # noqa: E402
from stream_influence.core.engine import InfluenceEngine  # noqa: E402
from stream_influence.core.settings import EngineSettings  # noqa: E402
from stream_influence.core.state import encode_engine  # noqa: E402
from stream_influence.io.model_topic import Snapshot, SnapshotId  # noqa: E402
from stream_influence.offline.datasets import Stream, load_stream  # noqa: E402
from stream_influence.service.roles import engine_from_snapshot  # noqa: E402
from tests.fixtures.broker import Broker, fresh_topic  # noqa: E402
from tests.fixtures.service_events import latest_checkpoint, produce, write_config  # noqa: E402

PARTITIONS = 4


def _config(tmp: Path, name: str, broker: Broker, topic: str, ref: str) -> Path:
    return write_config(
        tmp / f"{name}.yaml",
        broker.bootstrap,
        topic,
        tmp / name,
        engine={"reference": {"min_size": 100}},
        kafka={"reference_topic": ref, "process_batch_size": 512, "max_poll_records": 2000},
        checkpoint={"every_events": 2000, "every_seconds": 1.0},
        metrics={"enabled": False},
        scaleout={
            "updates_topic": f"{topic}.updates",
            "model_topic": f"{topic}.model",
            "updater_group_id": f"{topic}.updater",
            "updates_partitions": PARTITIONS,
            "max_model_lag_versions": 3,
            "snapshot_every_seconds": 0,
        },
    )


def _start(config: Path, role: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_influence", "run", "--role", role, "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
        )


def _learned(ckdir: Path) -> int:
    ck = latest_checkpoint(ckdir)
    return 0 if ck is None else int(ck.engine.events_seen)


def run_config(
    broker: Broker, workers: int, refs: list[bytes], events: list[bytes], tmp: Path
) -> dict[str, Any]:
    """``workers`` = 0: one ``--role all`` process; else that many scorers + one updater."""
    topic = fresh_topic(broker, f"so{workers}", partitions=PARTITIONS)
    ref = fresh_topic(broker, f"so{workers}-ref")
    produce(broker.bootstrap, ref, refs)
    produce(broker.bootstrap, topic, events)
    n = len(events)
    if workers == 0:
        cfg = _config(tmp, f"all-{topic}", broker, topic, ref)
        procs = [_start(cfg, "all", tmp / f"{topic}.log")]
        ckdir = tmp / f"all-{topic}"
    else:
        upd = _config(tmp, f"upd-{topic}", broker, topic, ref)
        procs = [_start(upd, "update", tmp / f"{topic}-upd.log")]
        procs += [
            _start(_config(tmp, f"s{i}-{topic}", broker, topic, ref), "score", tmp / f"{topic}-s{i}.log")
            for i in range(workers)
        ]
        ckdir = tmp / f"upd-{topic}"
    t_start = time.monotonic()
    t10 = t100 = None
    try:
        deadline = t_start + 600
        while time.monotonic() < deadline:
            done = _learned(ckdir)
            now = time.monotonic()
            if t10 is None and done >= 0.1 * n:
                t10, d10 = now, done
            if done >= n:
                t100 = now
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
    if t10 is None or t100 is None:
        raise RuntimeError(f"{workers} workers: not finished (learned {_learned(ckdir)} of {n})")
    size = max((p.stat().st_size for p in ckdir.glob("checkpoint-*.safetensors")), default=0)
    return {
        "workers": workers,
        "events": n,
        "rate": (n - d10) / (t100 - t10),
        "total_s": t100 - t_start,
        "checkpoint_bytes": size,
    }


def model_inputs(refs: list[bytes], events: list[bytes]) -> dict[str, float]:
    """Per-worker scoring rate, updater learning rate, snapshot size and encode/decode cost."""
    settings = EngineSettings.model_validate({"reference": {"min_size": 100}})
    engine = InfluenceEngine(settings)
    engine.add_reference(refs)
    engine.prepare_snapshot()
    B = 512
    t0 = time.perf_counter()
    decided = []
    for i in range(0, len(events), B):
        batch, rejects = engine.decode(events[i : i + B], learn=False)
        decided.append((batch, engine.score_events(batch, rejects).quarantine))
    score_rate = len(events) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for batch, q in decided:
        engine.learn_events(batch, q)
    learn_rate = len(events) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    engine.prepare_snapshot()
    data = encode_engine(engine, {"epoch": 1, "version": 1})
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine_from_snapshot(Snapshot(SnapshotId(1, 1), data, 0.0, ""), settings)
    decode_s = time.perf_counter() - t0
    return {
        "score_rate": score_rate,
        "learn_rate": learn_rate,
        "snapshot_bytes": len(data),
        "encode_ms": encode_s * 1000,
        "decode_ms": decode_s * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=40_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--no-docs", action="store_true", help="print only, do not write docs/benchmarks.md")
    args = ap.parse_args()
    stream = load_stream("hyperplane", noise=0.3, seed=5, n_events=args.events)
    refs = Stream.encode(stream.reference_dicts())
    events = Stream.encode(stream.event_dicts())
    inputs = model_inputs(refs, events)
    print(inputs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker().start()
        try:
            for w in [0, *args.workers]:
                r = run_config(broker, w, refs, events, Path(tmp))
                print(r)
                rows.append(r)
        finally:
            broker.stop()
    single = rows[0]["rate"]
    cmd = f"PYTHONPATH=. python benchmarks/scaleout.py --events {args.events} --workers {' '.join(map(str, args.workers))}"
    lines = [
        "## Scale-out: score workers + one updater (`benchmarks/scaleout.py`)",
        "",
        f"`{cmd}` — {platform.node()}, {os.cpu_count()} CPUs shared with other work, embedded broker "
        f"(Tansu), Hyperplane (d=10, 2 classes, 30 % noise), {args.events:,} events on {PARTITIONS} "
        "partitions produced before the processes start; rate = events learned per second between "
        "10 % and 100 % of the stream (startup and group joins excluded); checkpoint (= snapshot) "
        "every 2,000 events or 1 s, `max_model_lag_versions` 3.",
        "",
        "| processes | events/s | vs one `--role all` process | wall time incl. start-up |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        name = "1 × `--role all` (baseline)" if r["workers"] == 0 else f"{r['workers']} scorer(s) + 1 updater"
        lines.append(f"| {name} | {r['rate']:,.0f} | {r['rate'] / single:.2f} | {r['total_s']:.1f} s |")
    lines += [
        "",
        "Inputs of the scaling model, measured in-process on the same events (one core, no broker):",
        "",
        f"- a worker decodes, scores and routes {inputs['score_rate']:,.0f} events/s (`score_events`);",
        f"- the updater learns {inputs['learn_rate']:,.0f} events/s (`learn_events`);",
        f"- a snapshot is {inputs['snapshot_bytes'] / 1024:,.0f} KiB; encoding it takes "
        f"{inputs['encode_ms']:.1f} ms and a worker's verified decode {inputs['decode_ms']:.1f} ms, "
        "once per checkpoint.",
        "",
        "**Model.** With W workers the stream is bounded by min(W × r_worker, r_updater, r_broker), "
        "where r_worker is the worker's scoring rate *including its Kafka I/O* (consume, produce the "
        "updates record for every valid event and the quarantine copies) and r_updater the updater's "
        "(consume the updates topic + learn).  The updater consumes every event once more, so it is "
        "the ceiling: past W ≈ r_updater / r_worker workers, more workers only add lag on the "
        "updates topic.  Snapshot cost is per checkpoint, not per event (size × workers bytes per "
        "checkpoint interval on the model topic).  On this 2-core machine every process shares the "
        "same two cores, so more workers cannot run faster than one: the table shows the overhead "
        "of the split (an extra consume + produce per event), not the scaling — run it where each "
        "process has its own core to see the W × r_worker regime.",
        "",
        f"**What this run shows.** The split sustains {min(r['rate'] for r in rows[1:]) / single:.2f}–"
        f"{max(r['rate'] for r in rows[1:]) / single:.2f} of one `--role all` process here, and adding "
        "workers does not help on 2 shared cores (a miss against any scaling claim on this machine). "
        "Not profiled yet; the likely costs, in the order to check: the second consume + produce of "
        "every event, per-event header building for the updates records, and workers idling at the "
        "staleness bound while a snapshot makes its way (worker flush → updater learn → checkpoint → "
        "publish → swap).",
    ]
    if not args.no_docs:
        write_section("scaleout", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
