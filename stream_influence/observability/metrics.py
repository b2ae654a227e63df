"""Prometheus metrics of the service, and the HTTP endpoint that serves them with health checks.

Every metric carries the prefix ``stream_influence_`` and uses base units (seconds, ratios in
0..1); counters end in ``_total``; latencies and influence scores are histograms.  The full list,
with types, labels and meaning, is in docs/metrics.md — keep the two in step.

Two kinds of counters live here:

* *process counters* (events consumed, decisions, outputs, policy reloads) count what this
  process did since it started, so they equal what it wrote to the output topics;
* *engine counters* (model updates, curvature re-factorisations and their failures, drift
  resets) mirror the engine's lifetime counts, which are checkpointed.  After a restart that
  restores an older checkpoint such a counter can step down; Prometheus treats that as a counter
  reset, which ``rate``/``increase`` handle.

Per-event score histograms are filled with numpy (one ``searchsorted`` per batch) rather than one
``Histogram.observe`` call per event, which would cost more than scoring the batch.

>>> m = ServiceMetrics()
>>> m.set_lag("events", 0, 42)
>>> m.registry.get_sample_value("stream_influence_consumer_lag_messages",
...                             {"topic": "events", "partition": "0"})
42.0
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from stream_influence import __version__
from stream_influence.core.events import RejectReason
from stream_influence.core.policy import QUARANTINE_REASONS, REASONS
from stream_influence.errors import CorruptReason

if TYPE_CHECKING:
    from stream_influence.core.engine import BatchResult, EngineSummary
    from stream_influence.core.settings import EngineSettings, PolicySettings

__all__ = [
    "DECISIONS",
    "PREFIX",
    "MetricsServer",
    "ServiceMetrics",
]

log = logging.getLogger(__name__)

PREFIX = "stream_influence_"
# Decision label values: the keys of BatchResult.counts().
DECISIONS = ("accepted", "quarantined", "dead_lettered")
# Reasons each decision can carry (policy.REASONS for valid events, RejectReason for dead letters).
_ACCEPT_REASONS = tuple(r for r in REASONS if r not in QUARANTINE_REASONS)
OUTPUT_KINDS = ("quarantine", "dead_letter", "accepted", "decisions")

# Bucket bounds.  Scores are signed (positive = harmful), so the buckets are symmetric around 0,
# with the default quarantine threshold of cosine influence (0.02) on a boundary.
_INFLUENCE_BUCKETS = tuple(
    [-(10.0**e) for e in range(1, -5, -1)] + [0.0] + [10.0**e for e in range(-4, 2)]
)  # ±1e-4 … ±10, log-spaced: raw influence scales with the loss and the Hessian
_REL_BUCKETS = (-5.0, -2.0, -1.0, -0.5, -0.2, -0.1, -0.05, -0.02, -0.01, 0.0,
                0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)  # fmt: skip
_COS_BUCKETS = (-1.0, -0.8, -0.6, -0.4, -0.2, -0.1, -0.05, -0.02, -0.01, 0.0,
                0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)  # fmt: skip
# Batch processing of ≤ a few thousand events: 1 ms … 10 s.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_CHECKPOINT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _ArrayHistogram(Collector):
    """A labelled histogram filled a whole array at a time (numpy), exposed as a Prometheus
    histogram.  Non-finite values (scores of warm-up events are NaN) are not observed."""

    def __init__(self, name: str, documentation: str, label: str, bounds: Iterable[float]) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.bounds = np.asarray(sorted(bounds), dtype=np.float64)
        self._lock = threading.Lock()
        self._data: dict[str, np.ndarray] = {}  # label value → per-bucket (not cumulative) counts

    def prime(self, value: str) -> None:
        with self._lock:
            self._data.setdefault(value, np.zeros(len(self.bounds) + 1, np.int64))

    def observe_many(self, value: str, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        # Bucket i counts values ≤ bounds[i] (Prometheus "le"); index len(bounds) is +Inf.
        idx = np.searchsorted(self.bounds, x, side="left")
        add = np.bincount(idx, minlength=len(self.bounds) + 1)
        with self._lock:
            self._data.setdefault(value, np.zeros(len(self.bounds) + 1, np.int64))[:] += add

    def collect(self) -> Iterable[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            items = [(k, c.copy()) for k, c in sorted(self._data.items())]
        for value, counts in items:
            cum = np.cumsum(counts)
            buckets = [(_le(b), float(c)) for b, c in zip(self.bounds, cum[:-1], strict=True)]
            buckets.append(("+Inf", float(cum[-1])))
            # Scores are signed, so the sum can go down: OpenMetrics forbids _sum on histograms
            # with negative buckets (rate() of it would be wrong) and prometheus_client then
            # drops _count too.  _count is monotonic, so it is added back by hand.
            fam.add_metric([value], buckets, None)
            fam.samples.append(Sample(self.name + "_count", {self.label: value}, float(cum[-1])))
        yield fam

    def describe(self) -> Iterable[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=[self.label])


def _le(b: float) -> str:
    # Prometheus clients render bounds as Go floats ("0.02", "1e-04" is legal but "0.0001" is
    # what people grep for); repr of a Python float is exact and round-trips.
    return repr(float(b))


class _EngineCounters(Collector):
    """Counters that mirror the engine's checkpointed lifetime counts (see module docstring)."""

    # (metric name without prefix, help, the summary field, extra labels)
    _SPEC: tuple[tuple[str, str, Callable[[EngineSummary], int | None], dict[str, str]], ...] = (
        ("model_updates_total", "Online updates applied to the head (events learned).",
         lambda s: s.updates_applied, {"model": "routed"}),
        ("model_updates_total", "Online updates applied to the head (events learned).",
         lambda s: s.shadow_updates_applied, {"model": "shadow"}),
        ("curvature_refactorizations_total",
         "Re-factorisations of the curvature estimate from scratch (periodic or forced).",
         lambda s: s.refactorizations, {}),
        ("curvature_refactorization_failures_total",
         "Re-factorisations that failed (the estimate was not positive definite) and were "
         "recovered by resetting the curvature to λI.", lambda s: s.refactor_failures, {}),
        ("drift_resets_total", "Resets of the learned state triggered by the drift detector.",
         lambda s: s.drift_resets, {}),
        ("reference_events_total", "Trusted events added to the reference buffer.",
         lambda s: s.reference_events, {}),
    )  # fmt: skip

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._summary: EngineSummary | None = None

    def update(self, summary: EngineSummary) -> None:
        with self._lock:
            self._summary = summary  # frozen: safe to share with the scrape thread

    def collect(self) -> Iterable[CounterMetricFamily]:
        with self._lock:
            summary = self._summary
        fams: dict[str, CounterMetricFamily] = {}
        for name, doc, field_of, labels in self._SPEC:
            full = PREFIX + name.removesuffix("_total")
            fam = fams.get(full)
            if fam is None:
                fam = fams[full] = CounterMetricFamily(full, doc, labels=sorted(labels))
            value = field_of(summary) if summary is not None else None
            # Exposed from the start (at 0) so that rate()/increase() see the first increment.
            fam.add_metric([labels[k] for k in sorted(labels)], float(value or 0))
        yield from fams.values()

    def describe(self) -> Iterable[CounterMetricFamily]:
        return self.collect()


class _CheckpointFallbacks(Collector):
    """``checkpoint_fallbacks_total{reason}``: checkpoints skipped as corrupt, read at scrape time
    from the checkpoint store (which counts them before the metrics exist, at start-up)."""

    name = PREFIX + "checkpoint_fallbacks"
    doc = (
        "Checkpoints skipped as corrupt on restore (the previous good one was used), by reason; "
        "non-zero: inspect the checkpoint directory."
    )

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, int]] | None = None

    def collect(self) -> Iterable[CounterMetricFamily]:
        counts = self.source() if self.source is not None else {}
        fam = CounterMetricFamily(self.name, self.doc, labels=["reason"])
        for reason in CorruptReason:  # every reason from the start, so increase() sees the first
            fam.add_metric([reason.value], float(counts.get(reason.value, 0)))
        yield fam

    def describe(self) -> Iterable[CounterMetricFamily]:
        return self.collect()


class ServiceMetrics:
    """All metrics the service exports, on one registry (a fresh one unless given).

    The service calls :meth:`observe_batch` once per polled batch, :meth:`observe_commit` after
    each offset commit, :meth:`observe_checkpoint` after each durable checkpoint,
    :meth:`set_lag` per assigned partition, :meth:`policy_reloaded` on each reload attempt,
    :meth:`observe_outputs` per produced batch of output messages and :meth:`set_broker_up`.
    ``engine_settings`` (optional) fills the build info's curvature label and the policy gauges;
    :meth:`set_policy` updates the latter after a hot reload.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        engine_settings: EngineSettings | None = None,
        process_metrics: bool = True,
    ) -> None:
        # No *_created series: they double the exposition and no dashboard or alert uses them.
        disable_created_metrics()
        self.registry = reg = registry if registry is not None else CollectorRegistry()
        p = PREFIX
        if process_metrics:
            # process_cpu_seconds_total, process_resident_memory_bytes, … (standard names).
            ProcessCollector(registry=reg)

        self.build_info = Gauge(
            p + "build_info", "Always 1; labels identify the build and the curvature estimator.",
            ["version", "python", "curvature"], registry=reg,
        )  # fmt: skip
        curvature = engine_settings.curvature.kind if engine_settings is not None else "unknown"
        self.set_build_info(curvature)
        self.start_time = Gauge(
            p + "start_time_seconds", "Unix time the service process started.", registry=reg
        )
        self.start_time.set(time.time())

        # -- throughput and decisions (process counters) ----------------------------------------
        self.consumed = Counter(
            p + "events_consumed",
            "Messages consumed from the training-events topic (each input offset once: a replayed "
            "window is not counted again).",
            registry=reg,
        )
        self.decisions = Counter(
            p + "decisions",
            "Consumed messages by decision (accepted, quarantined, dead_lettered) and reason; "
            "sum over both labels equals events_consumed.",
            ["decision", "reason"], registry=reg,
        )  # fmt: skip
        for reason in _ACCEPT_REASONS:
            self.decisions.labels("accepted", reason)
        for reason in QUARANTINE_REASONS:
            self.decisions.labels("quarantined", reason)
        for reject in RejectReason:
            self.decisions.labels("dead_lettered", reject.value)
        self.batches = Counter(p + "batches", "Polled batches processed.", registry=reg)
        self.outputs = Counter(
            p + "output_messages",
            "Messages produced to output topics, by output (quarantine, dead_letter, accepted, "
            "decisions).", ["output"], registry=reg,
        )  # fmt: skip
        for kind in OUTPUT_KINDS:
            self.outputs.labels(kind)

        # -- score distributions ---------------------------------------------------------------
        self.influence = _ArrayHistogram(
            p + "influence",
            "Influence I(z) = −∇L_Rᵀ H⁻¹ g(z) of scored events by decision (positive = harmful).",
            "decision", _INFLUENCE_BUCKETS,
        )  # fmt: skip
        self.relative_influence = _ArrayHistogram(
            p + "relative_influence",
            "Relative influence I(z)/sqrt(gᵀH⁻¹g) of scored events by decision.",
            "decision", _REL_BUCKETS,
        )  # fmt: skip
        self.cosine_influence = _ArrayHistogram(
            p + "cosine_influence",
            "Cosine influence (in [-1, 1]) of scored events by decision.",
            "decision", _COS_BUCKETS,
        )  # fmt: skip
        for h in (self.influence, self.relative_influence, self.cosine_influence):
            for d in ("accepted", "quarantined"):
                h.prime(d)
            reg.register(h)

        # -- latencies ----------------------------------------------------------------------------
        self.batch_duration = Histogram(
            p + "batch_duration_seconds",
            "Time to decode, score, route and learn one polled batch.",
            buckets=_LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.poll_to_commit = Histogram(
            p + "poll_to_commit_seconds",
            "Time from a batch's poll to the commit of its offsets (outputs flushed, checkpoint "
            "durable where due).", buckets=_LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.checkpoint_duration = Histogram(
            p + "checkpoint_duration_seconds", "Time to write one checkpoint durably.",
            buckets=_CHECKPOINT_BUCKETS, registry=reg,
        )  # fmt: skip
        self.last_checkpoint = Gauge(
            p + "last_checkpoint_timestamp_seconds",
            "Unix time of the last durable checkpoint (0 = none yet); age = time() - this.",
            registry=reg,
        )  # fmt: skip
        self.checkpoints = Counter(p + "checkpoints", "Checkpoints written.", registry=reg)
        self.checkpoint_fallbacks = _CheckpointFallbacks()
        reg.register(self.checkpoint_fallbacks)

        # -- consumer ---------------------------------------------------------------------------
        self.lag = Gauge(
            p + "consumer_lag_messages",
            "Messages not yet consumed per assigned partition (highwater − position).",
            ["topic", "partition"], registry=reg,
        )  # fmt: skip
        self.broker_up = Gauge(
            p + "broker_up", "1 when the last broker interaction succeeded, else 0.", registry=reg
        )
        self.last_event = Gauge(
            p + "last_event_timestamp_seconds",
            "Unix time the last non-empty batch was processed.", registry=reg,
        )  # fmt: skip

        # -- model quality --------------------------------------------------------------------
        self.rolling_accuracy = Gauge(
            p + "rolling_accuracy",
            "Prequential (test-then-train) accuracy over the rolling window, by model: routed "
            "(learns accepted events) or shadow (learns every valid event).",
            ["model"], registry=reg,
        )  # fmt: skip
        self.rolling_log_loss = Gauge(
            p + "rolling_log_loss", "Prequential log-loss over the rolling window, by model.",
            ["model"], registry=reg,
        )  # fmt: skip
        self.prequential_accuracy = Gauge(
            p + "prequential_accuracy", "Prequential accuracy since the start, by model.",
            ["model"], registry=reg,
        )  # fmt: skip
        self.reference_loss = Gauge(
            p + "reference_loss", "Loss of the routed head on the trusted reference set.",
            registry=reg,
        )  # fmt: skip
        self.reference_size = Gauge(
            p + "reference_buffer_events", "Events in the trusted reference buffer.", registry=reg
        )
        self.model_version = Gauge(
            p + "model_version", "Version of the routed model (one step per learning batch).",
            registry=reg,
        )  # fmt: skip
        self.warm = Gauge(p + "warm", "1 once the engine scores events (warm-up over), else 0.", registry=reg)
        self.engine_counters = _EngineCounters()
        reg.register(self.engine_counters)

        # -- curvature health ---------------------------------------------------------------------
        self.damping = Gauge(
            p + "curvature_damping", "Damping λ in force in the curvature estimate.", registry=reg
        )
        self.condition_number = Gauge(
            p + "curvature_condition_number",
            "Condition-number estimate of the damped curvature.", registry=reg,
        )  # fmt: skip
        # Undefined until the model exists: NaN (a gap in Grafana), not a misleading 0.
        for g in (self.damping, self.condition_number, self.reference_loss):
            g.set(float("nan"))

        # -- policy ------------------------------------------------------------------------------
        self.quarantine_rate = Gauge(
            p + "quarantine_rate", "Rolling fraction of scored events quarantined.", registry=reg
        )
        self.alarm = Gauge(
            p + "quarantine_alarm",
            "1 while the quarantine-rate cap is hit, or recent events score above their threshold beyond "
            "it before the disagreement gate (drift or a broken reference), else 0.",
            registry=reg,
        )  # fmt: skip
        self.threshold = Gauge(
            p + "policy_threshold",
            "Thresholds in force on the policy score: quarantine (score > this, may be raised by "
            "quantile mode) and accept (score ≤ this).", ["kind"], registry=reg,
        )  # fmt: skip
        self.max_quarantine_rate = Gauge(
            p + "policy_max_quarantine_rate",
            "Quarantine-rate cap of the policy; above it the alarm is raised.", registry=reg,
        )  # fmt: skip
        self.policy_version = Gauge(
            p + "policy_version", "Version of the routing policy in force.", registry=reg
        )
        self.policy_reloads = Counter(
            p + "policy_reloads", "Policy reload attempts by result (ok, error).", ["result"],
            registry=reg,
        )  # fmt: skip
        for result in ("ok", "error"):
            self.policy_reloads.labels(result)
        if engine_settings is not None:
            self.set_policy(engine_settings.policy)

    # -- what the service calls -------------------------------------------------------------------
    def set_build_info(self, curvature: str) -> None:
        self.build_info.clear()
        self.build_info.labels(__version__, platform.python_version(), curvature).set(1)

    def observe_batch(
        self,
        result: BatchResult,
        summary: EngineSummary,
        duration_s: float,
        fresh: np.ndarray | None = None,
    ) -> None:
        """Count one processed batch: decisions by reason, score histograms, duration, and the
        engine's state from ``engine.summary()`` taken after the batch.  ``fresh`` (one flag per
        input message) marks the messages not counted before: a replayed window is processed
        again but counted once."""
        self.batches.inc()
        self.batch_duration.observe(duration_s)
        n_input = result.n_input or (len(result.events) + len(result.rejects))
        if fresh is None:
            fresh = np.ones(n_input, dtype=bool)
        self.consumed.inc(int(fresh.sum()))
        if n_input:
            self.last_event.set(time.time())

        quarantine = np.asarray(result.quarantine, dtype=bool)
        if len(quarantine):
            new_rows = fresh[np.asarray(result.events.index, dtype=np.intp)]
            # Count per (decision, reason) with numpy: reasons repeat a handful of values.
            reasons = np.asarray(result.reasons, dtype=object)
            for decision, mask in (
                ("accepted", ~quarantine & new_rows),
                ("quarantined", quarantine & new_rows),
            ):
                if mask.any():
                    values, counts = np.unique(reasons[mask].astype(str), return_counts=True)
                    for reason, c in zip(values.tolist(), counts.tolist(), strict=True):
                        self.decisions.labels(decision, reason).inc(c)
                    scores = result.scores
                    self.influence.observe_many(decision, scores.influence[mask])
                    self.relative_influence.observe_many(decision, scores.relative_influence[mask])
                    self.cosine_influence.observe_many(decision, scores.cosine_influence[mask])
        if result.rejects:
            per_reason: dict[str, int] = {}
            for r in result.rejects:
                if not fresh[r.index]:
                    continue
                key = getattr(r.reason, "value", str(r.reason))
                per_reason[key] = per_reason.get(key, 0) + 1
            for reason, c in per_reason.items():
                self.decisions.labels("dead_lettered", reason).inc(c)

        self.threshold.labels("quarantine").set(float(result.threshold))
        self.alarm.set(1.0 if result.alarm else 0.0)
        self.policy_version.set(result.policy_version)
        self.model_version.set(result.model_version)
        self.update_summary(summary)

    def update_summary(self, summary: EngineSummary) -> None:
        """Set the gauges and engine counters from ``engine.summary()`` (also usable before the
        first batch, e.g. right after restoring a checkpoint)."""
        s = summary
        self.engine_counters.update(s)
        self.warm.set(1.0 if s.warm else 0.0)
        self.alarm.set(1.0 if s.alarm else 0.0)
        self.quarantine_rate.set(s.quarantine_rate)
        self.threshold.labels("quarantine").set(s.threshold)
        self.policy_version.set(s.policy_version)
        self.model_version.set(s.model_version)
        self.reference_loss.set(s.reference_loss)
        self.reference_size.set(s.reference_size)
        for model, rolling, log_loss, prequential in (
            ("routed", s.rolling_accuracy, s.rolling_log_loss, s.prequential_accuracy),
            ("shadow", s.shadow_rolling_accuracy, s.shadow_rolling_log_loss, s.shadow_prequential_accuracy),
        ):
            _set(self.rolling_accuracy.labels(model), rolling)
            _set(self.rolling_log_loss.labels(model), log_loss)
            _set(self.prequential_accuracy.labels(model), prequential)
        _set(self.damping, s.damping_in_use)
        _set(self.condition_number, s.condition_number)

    def set_policy(self, policy: PolicySettings, version: int | None = None) -> None:
        """Policy gauges from the settings in force (at start and after a hot reload)."""
        self.threshold.labels("accept").set(policy.accept_threshold)
        # The quantile mode may raise the quarantine threshold; observe_batch sets the one in force.
        self.threshold.labels("quarantine").set(policy.quarantine_threshold)
        self.max_quarantine_rate.set(policy.max_quarantine_rate)
        if version is not None:
            self.policy_version.set(version)

    def observe_commit(self, poll_to_commit_s: float) -> None:
        self.poll_to_commit.observe(poll_to_commit_s)

    def count_checkpoint_fallbacks(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Export the checkpoint store's fallback counts (``CheckpointStore.fallback_counts``)."""
        self.checkpoint_fallbacks.source = source

    def observe_checkpoint(self, duration_s: float, written_at: float) -> None:
        self.checkpoints.inc()
        self.checkpoint_duration.observe(duration_s)
        self.last_checkpoint.set(written_at)

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        self.lag.labels(topic, str(partition)).set(lag)

    def remove_lag(self, topic: str, partition: int) -> None:
        """Drop a revoked partition's lag series (so a moved partition is not reported twice)."""
        with contextlib.suppress(KeyError):
            self.lag.remove(topic, str(partition))

    def policy_reloaded(self, version: int, ok: bool, policy: PolicySettings | None = None) -> None:
        self.policy_reloads.labels("ok" if ok else "error").inc()
        if ok:
            self.policy_version.set(version)
            if policy is not None:
                self.set_policy(policy)

    def observe_outputs(self, topic_kind: str, n: int) -> None:
        self.outputs.labels(topic_kind).inc(n)

    def set_broker_up(self, up: bool) -> None:
        self.broker_up.set(1.0 if up else 0.0)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (what /metrics serves)."""
        return generate_latest(self.registry)


def _set(gauge: Gauge, value: float | None) -> None:
    """Set a gauge whose value is undefined (``None``) until the model exists."""
    if value is not None:
        gauge.set(value)


ReadyFn = Callable[[], tuple[bool, dict[str, Any]]]


class MetricsServer:
    """/metrics, /healthz and /readyz on one ``ThreadingHTTPServer`` in a daemon thread.

    ``ready()`` returns ``(ready, details)``; /readyz answers 200 with the details as JSON when
    ready, else 503 with them.  Port 0 binds an ephemeral port; :attr:`port` is the real one.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry, ready: ReadyFn) -> None:
        self.host, self._requested_port = host, port
        self.registry, self.ready = registry, ready
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            return self._requested_port
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> MetricsServer:
        if self._httpd is not None:
            return self
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                    elif path == "/healthz":
                        self._send(200, b"ok\n", "text/plain; charset=utf-8")
                    elif path == "/readyz":
                        try:
                            ok, details = server.ready()
                        except Exception as exc:  # a broken probe means "not ready", not a crash
                            ok, details = False, {"error": f"{type(exc).__name__}: {exc}"}
                        body = json.dumps({"ready": bool(ok), **details}, default=str, sort_keys=True)
                        self._send(200 if ok else 503, body.encode() + b"\n", "application/json")
                    else:
                        self._send(404, b"not found\n", "text/plain; charset=utf-8")
                except BrokenPipeError:
                    pass

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics http: " + format, *args)

        httpd = ThreadingHTTPServer((self.host, self._requested_port), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="metrics-http", daemon=True
        )
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._requested_port = int(httpd.server_address[1])

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
