"""The consumer service behind ``stream-influence run``: the loop that composes the parts.

One process = one consumer in the group + one engine (its own model) + one checkpoint
directory, all owned by **one thread** (the one that calls :meth:`Service.run`): every broker
call, every engine change and every checkpoint happens there.  Other threads only set flags or
read immutable snapshots: the backend's rebalance callbacks record events
(:meth:`~stream_influence.io.broker.BrokerConsumer.rebalances`), signal handlers set a flag, the
HTTP thread reads the latest :class:`~stream_influence.service.health.HealthSnapshot`.

The loop, per poll:

1. ``consumer.poll`` → records; then the rebalance events recorded meanwhile are acted on:
   *revoked* partitions are flushed, checkpointed and committed (the backend holds the group's
   move back until then), *assigned* ones sought to where this model stands;
2. new reference events (read outside the group) go to ``engine.add_reference`` first;
3. every ready chunk (:func:`~stream_influence.service.chunker.plan_chunks`: aligned to input
   offsets, so a replay cuts the same batches) is processed and its outputs produced by the
   :class:`~stream_influence.service.emitter.Emitter`;
4. every ``checkpoint.every_events`` events or ``checkpoint.every_seconds``: the
   :class:`~stream_influence.service.checkpointer.Checkpointer` flushes → checkpoints → commits,
   or the window is rolled back;
5. about once a second: lag, broker reachability, policy reload, the health snapshot.

On start and on every assignment each partition is sought to the offset the model has reached
(``max(checkpoint offset, committed offset)``), so an event is applied to a model once, however
the process died.  See docs/architecture.md for the guarantees step by step.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Set
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np

from stream_influence.config import AppSettings, limit_blas_threads
from stream_influence.core.engine import BatchResult, EngineSummary, InfluenceEngine
from stream_influence.core.learner import load_kernels
from stream_influence.errors import ConfigError, ReplayLimitError
from stream_influence.io.broker import (
    Broker,
    BrokerProducer,
    ConsumedRecord,
    RebalanceKind,
    TopicPartition,
    open_broker,
)
from stream_influence.io.lag import LagCheck
from stream_influence.io.reference import ReferenceReader
from stream_influence.observability.metrics import MetricsServer, ServiceMetrics
from stream_influence.service.checkpoint import Checkpoint, CheckpointStore, PendingCheckpoint
from stream_influence.service.checkpointer import Checkpointer
from stream_influence.service.chunker import plan_chunks
from stream_influence.service.emitter import Emitter, Sent
from stream_influence.service.health import Health
from stream_influence.service.reload import PolicyReloader

__all__ = ["Service", "run_service"]

log = logging.getLogger(__name__)

#: How often at most the loop republishes :attr:`Service.summary` while the engine changes.
_SUMMARY_EVERY_S = 0.1
# A chunk's offsets and values, read by map in C rather than a comprehension per record.
_OFFSET, _VALUE = attrgetter("offset"), attrgetter("value")


@dataclass(slots=True)
class _Writing:
    """An interval checkpoint being written on the store's writer thread, and what the loop
    commits once it is durable."""

    pending: PendingCheckpoint
    offsets: dict[TopicPartition, int]
    polls: list[float]  # poll times of the chunks it covers (poll → commit latency)
    started: float  # perf_counter when the flush began


class Service:
    """``stream-influence run``: see the module docstring."""

    def __init__(
        self,
        cfg: AppSettings,
        *,
        config_path: Path | None = None,
        install_signals: bool = True,
        broker: Broker | None = None,
    ) -> None:
        self.cfg = cfg
        # Policy hot reload: SIGHUP or a change of the config file (only engine.policy is hot).
        self.reloader = PolicyReloader(config_path, cfg.engine.policy)
        self.k = cfg.kafka
        self.install_signals = install_signals
        self.broker: Broker | None = broker  # the backend; opened by run() unless given
        self.store = CheckpointStore(cfg.checkpoint.directory, cfg.checkpoint.keep)
        self.stop_event = threading.Event()
        self._signalled: str | None = None  # set by a signal handler, acted on by the loop
        self.engine = InfluenceEngine(cfg.engine)
        self.emitter = Emitter(self.k, lambda kind, n: self._metric("observe_outputs", kind, n))
        self.checkpointer = Checkpointer(self.store, self.emitter, self.k)
        self.health = Health()
        #: The engine summary as of the end of a recent step (at most ``_SUMMARY_EVERY_S`` behind
        #: the engine): replaced, never changed, so other threads (the demo's progress view) read
        #: it without a lock.
        self.summary: EngineSummary = self.engine.summary()
        self._summary_key_published: tuple[int, ...] | None = None
        self._summary_published_at = -_SUMMARY_EVERY_S
        self.next_offsets: dict[tuple[str, int], int] = {}  # first offset not applied to the model
        # Where a partition unknown to checkpoints and commits started (auto_offset_reset), so a
        # rollback before its first checkpoint can go back there.
        self.start_offsets: dict[tuple[str, int], int] = {}
        self.reference_offsets: dict[int, int] = {}
        # Partitions whose restored offsets win over the committed ones: the restore fell back
        # past a corrupt checkpoint whose window was committed but is lost with it.
        self.replay_from_checkpoint: set[tuple[str, int]] = set()
        self.pending: dict[TopicPartition, list[ConsumedRecord]] = defaultdict(list)
        self.pending_t0: dict[TopicPartition, float] = {}
        # Ends of the tail chunks cut short (partition caught up) since the last checkpoint: a
        # replay of the window cuts there again, so it batches — and decides — as the first try.
        self.cuts: dict[TopicPartition, set[int]] = defaultdict(set)
        self.owned: frozenset[TopicPartition] = frozenset()
        self.newly_assigned: set[TopicPartition] = set()
        self.dirty = False
        # True while a chunk (or reference batch) is being applied: an exception then leaves the
        # engine half-updated, and such a state must never reach a checkpoint.
        self.torn = False
        self.replays = 0  # consecutive rollbacks of the current window
        self.rollbacks = 0  # every rollback (a drain stops when one happens between its chunks)
        self._resume_at = 0.0  # back-off: no chunk is processed before this (monotonic) time
        # First offset of each partition not yet counted in the metrics (a replay is not new input).
        self.counted: dict[tuple[str, int], int] = {}
        self.events_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.uncommitted_polls: list[float] = []  # poll times of chunks not committed yet
        self.writing: _Writing | None = None  # the interval checkpoint on the writer thread
        self.caught_up = False  # the last poll returned less than max_poll_records
        self.needs_rollback = False
        self.broker_up = True
        self._lag = LagCheck()
        self._summary: Any = None
        self._summary_at = 0.0
        self._last_housekeeping = 0.0
        self.metrics: Any = None
        self._metric_failures: set[str] = set()
        self.metrics_server: Any = None
        self.reader: ReferenceReader | None = None
        self.consumer: Any = None  # a BrokerConsumer once run() subscribed
        self._producer_attempt = 0.0
        self.batches = 0
        self.crashed = False
        self._stop_deadline = float("inf")

    # -- what the emitter holds -----------------------------------------------------------
    @property
    def producer(self) -> BrokerProducer | None:
        """The output producer ((re)built lazily: building one blocks while the broker is down)."""
        return self.emitter.producer

    @producer.setter
    def producer(self, producer: BrokerProducer | None) -> None:
        self.emitter.producer = producer

    @property
    def inflight(self) -> list[Sent]:
        return self.emitter.inflight

    @property
    def send_error(self) -> BaseException | None:
        return self.emitter.send_error

    @send_error.setter
    def send_error(self, exc: BaseException | None) -> None:
        self.emitter.send_error = exc

    @property
    def outputs(self) -> dict[str, int]:
        return self.emitter.outputs

    @outputs.setter
    def outputs(self, outputs: dict[str, int]) -> None:
        self.emitter.outputs = defaultdict(int, outputs)

    @property
    def last_failure(self) -> str:
        return self.emitter.last_failure

    @last_failure.setter
    def last_failure(self, text: str) -> None:
        self.emitter.last_failure = text

    @contextlib.contextmanager
    def _changing_model(self) -> Iterator[None]:
        """Marks the engine torn until the block completes (an exception leaves it torn)."""
        self.torn = True
        yield
        self.torn = False

    # -- lifecycle ---------------------------------------------------------------------
    def request_stop(self, reason: str = "requested") -> None:
        """Ask the loop to stop after the current batch (sets flags only; any thread)."""
        if not self.stop_event.is_set():
            log.info("stopping (%s): finishing the batch, flushing, checkpointing", reason)
            self._stop_deadline = time.monotonic() + self.cfg.shutdown_grace_seconds
        self.stop_event.set()

    def _grace_ms(self, default_ms: int, share: float = 0.5) -> int:
        """``default_ms``, or while stopping at most ``share`` of the grace period left, so that
        flush, commit and close together fit in it even when every call runs into its timeout
        (the broker is down)."""
        if not self.stop_event.is_set():
            return default_ms
        left = self._stop_deadline - time.monotonic() - 0.5
        return max(100, min(default_ms, int(left * share * 1000)))

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            if self._signalled is not None:  # a second signal: the operator means now
                os._exit(1)
            self._signalled = signal.Signals(signum).name  # the loop acts on it

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: self.reloader.request())

    def _check_signal(self) -> None:
        if self._signalled is None or self.stop_event.is_set():
            return
        self.request_stop(self._signalled)
        # Safety net: a stop that overruns the grace period must not hang a deployment.
        grace = self.cfg.shutdown_grace_seconds
        t = threading.Timer(grace, self._overrun, args=(grace,))
        t.daemon = True
        t.start()

    @staticmethod
    def _overrun(grace: float) -> None:
        log.error("shutdown did not finish within %.1fs; exiting with status 1", grace)
        logging.shutdown()
        os._exit(1)

    def _restore(self, ck: Checkpoint | None = None, *, loaded: bool = False) -> None:
        """Install the latest good checkpoint (or ``ck``, already loaded), else an empty model."""
        if not loaded:
            ck = self.store.latest(self.cfg.engine)
        if ck is None:
            log.info("no checkpoint in %s: starting with an empty model", self.store.directory)
            self.engine = InfluenceEngine(self.cfg.engine)
            self._trust_reference()
            self.next_offsets, self.reference_offsets = {}, {}
            self.outputs = {}
            self._restored(None)
            return
        # Only at start-up: a rollback seeks its own partitions to the restored offsets anyway.
        self.replay_from_checkpoint = set(ck.offsets) if ck.skipped and self.consumer is None else set()
        self.engine = ck.engine
        self._trust_reference()
        if self.engine.policy.settings != self.reloader.current:
            # The configuration is the operator's word on the policy; the checkpoint keeps the rest.
            version = self.engine.set_policy(self.reloader.current)
            log.info("policy from the configuration differs from the checkpoint's: version %d", version)
        self.next_offsets = dict(ck.offsets)
        self.reference_offsets = dict(ck.reference_offsets)
        self.outputs = dict(ck.outputs)
        log.info(
            "restored checkpoint %s (%d events applied, offsets %s)",
            ck.path.name,
            self.engine.events_seen,
            {f"{t}-{p}": o for (t, p), o in sorted(ck.offsets.items())},
        )
        self._restored(ck)

    # -- hooks of the scale-out roles (service/roles.py); the defaults are the single process --
    def _restored(self, ck: Checkpoint | None) -> None:
        """Called after every restore (start-up and rollback) with the checkpoint installed."""

    def _subscribe(self) -> None:
        """Join the consumer group on the input topic (partitions come as recorded rebalances)."""
        self.consumer.subscribe([self.k.topic], hand_over=self._on_rebalance)

    def _apply_chunk(self, tp: TopicPartition, msgs: list[ConsumedRecord]) -> BatchResult:
        """Apply one offset-aligned chunk to the engine and queue its outputs."""
        result = self.engine.process(list(map(_VALUE, msgs)))
        self._emit(tp, msgs, result)
        return result

    def _checkpoint_extra(self) -> dict[str, Any]:
        """Role state saved in the checkpoint with the engine (the same atomic file)."""
        return {}

    def _after_checkpoint(self) -> None:
        """Called after a checkpoint is durable, before its offsets are committed."""

    def _trust_reference(self) -> None:
        # Every engine installed (start-up or rollback, checkpoint or empty): with a reference
        # topic the stream never defines a class, even before the trusted set arrives.
        if self.k.reference_topic:
            self.engine.trust_reference_labels()

    def run(self) -> int:
        """Consume until stopped; returns the process exit code."""
        if self.install_signals and threading.current_thread() is threading.main_thread():
            self._install_signals()
        limit_blas_threads(self.cfg.blas_threads)
        if self.broker is None:
            self.broker = open_broker(self.k)
        # A directory with no usable checkpoint refuses before Kafka is contacted; then an
        # unreachable broker fails in seconds with its cause, not after every client's timeout.
        ck = self.store.latest(self.cfg.engine)
        self.broker.check()
        self._restore(ck, loaded=True)
        self._start_metrics()
        self._ensure_producer()
        if self.k.create_output_topics:
            self.broker.ensure_topics(self._output_topics())
        if self.k.reference_topic:
            self.reader = ReferenceReader(
                self.broker, self.k.reference_topic, self.reference_offsets, self.k.max_poll_records
            )
            backlog = self.reader.read_backlog(self.k.reference_backlog_timeout_seconds)
            self._add_reference(backlog)
            log.info("reference topic %s: %d events read", self.k.reference_topic, len(backlog))
        elif self.cfg.engine.reference.seed_from_stream == 0 and self.engine.reference.size == 0:
            log.warning(
                "no kafka.reference_topic and engine.reference.seed_from_stream is 0: the reference "
                "set stays empty, so routing stays in warm-up and accepts everything; configure one"
            )
        self.consumer = self.broker.consumer()
        self._subscribe()
        log.info("consuming %s as group %s", self.k.topic, self.k.group_id)
        # What start-up built (modules, settings, the restored engine, the clients) lives as long
        # as the process: frozen, a full collection no longer walks it (_shutdown unfreezes).
        # Unfrozen, one took up to 170 ms on the loop thread every few seconds: the largest
        # stall in poll → commit (issue 11; docs/benchmarks.md, service_stages).
        # The compiled learner kernel too (~56,000 objects): loaded lazily, at the first warm
        # chunk, it stayed in the collector, and every full collection walked it (50–70 ms).
        load_kernels(self.cfg.engine.learner)
        gc.collect()
        gc.freeze()
        gave_up = False
        try:
            while True:
                self._check_signal()
                if self.stop_event.is_set():
                    break
                self._step()
        except ReplayLimitError as exc:
            self.crashed = True
            log.error("stopping: %s", exc)  # one line, no traceback: the cause is in it
            gave_up = True
        except BaseException:
            # The in-memory engine may hold half a batch: never checkpoint it.  The last durable
            # checkpoint plus a replay of the window is the consistent state.
            self.crashed = True
            raise
        finally:
            code = self._shutdown()
        return 1 if gave_up else code

    def _shutdown(self) -> int:
        gc.unfreeze()  # collectable again once this service is gone (tests run many per process)
        code = 0
        try:
            # A checkpoint being written holds a consistent state (captured between chunks): let
            # it become durable, crashed or not, before the process (or a restart) moves on.
            self._await_write()
        except Exception:
            log.exception("the checkpoint being written failed")
            self.crashed = True
            code = 1
        try:
            final = self.consumer is not None and not self.crashed
            if final and not self._checkpoint(force=True, reason="shutdown"):
                log.error(
                    "final checkpoint not written: the next start replays the window since the last one"
                )
                self.crashed = True
                code = 1
        except Exception:
            log.exception("final checkpoint failed")
            self.crashed = True
            code = 1
        closers: list[tuple[str, Any, Callable[[Any], Any]]] = [
            # close() leaves the group, so the partitions move to other members at once; the
            # revocation it reports is only recorded (this loop already checkpointed, or crashed).
            ("consumer", self.consumer, lambda c: c.close(self._grace_ms(5000))),
            ("producer", self.producer, lambda p: p.close(self._grace_ms(5000) / 1000)),
            ("reference reader", self.reader, lambda r: r.close()),
            ("metrics server", self.metrics_server, lambda m: m.stop()),
        ]
        for name, target, close in closers:
            if target is None:
                continue
            try:
                close(target)
            except Exception as exc:
                log.warning("closing the %s: %s", name, exc)
        log.info(
            "stopped: %s",
            {k: v for k, v in self.engine.counters.as_dict().items() if k != "dead_letter_reasons"},
        )
        return code

    # -- metrics and health ---------------------------------------------------------------
    def _start_metrics(self) -> None:
        m = self.cfg.metrics
        self.metrics = ServiceMetrics(engine_settings=self.cfg.engine)
        self.metrics.count_checkpoint_fallbacks(self.store.fallback_counts)
        self.metrics.set_policy(self.engine.policy.settings, self.engine.policy.version)
        self.metrics.update_summary(self.engine.summary())
        self._publish_health()
        if m.enabled:
            # The HTTP thread reads only the health snapshot this loop publishes.
            self.metrics_server = MetricsServer(m.host, m.port, self.metrics.registry, self.health.ready)
            try:
                self.metrics_server.start()
            except OSError as exc:
                self.metrics_server = None
                raise ConfigError(
                    f"cannot serve metrics on {m.host}:{m.port}: {exc.strerror or exc} "
                    "(set metrics.port to a free port, 0 for any, or metrics.enabled: false)"
                ) from exc
            log.info("metrics on http://%s:%d/metrics", m.host, self.metrics_server.port)

    def _publish_health(self) -> None:
        warm = self.engine.warm
        self.health.publish(self.owned, self.broker_up, warm, "" if warm else self.engine.not_warm_reason())

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """/readyz: partitions assigned, broker reachable, model warm (the published snapshot)."""
        return self.health.ready()

    def _metric(self, name: str, *args: Any) -> None:
        """Record one observation.  A failing metric never stops the stream, but it is not hidden
        either: its first failure is a warning with the traceback (later ones are debug lines).
        An unknown name is a bug, not a metrics outage, and raises."""
        if self.metrics is None:
            return
        record = getattr(self.metrics, name)
        try:
            record(*args)
        except Exception:
            first = name not in self._metric_failures
            self._metric_failures.add(name)
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "metrics.%s failed; the stream goes on%s",
                name,
                " (later failures of it are logged at debug level)" if first else "",
                exc_info=True,
            )

    def _summary_cached(self) -> Any:
        now = time.monotonic()
        if self._summary is None or now - self._summary_at >= 1.0:
            self._summary = self.engine.summary()
            self._summary_at = now
        return self._summary

    # -- rebalance (acted on by the loop, after the poll that recorded it) -------------------
    def _on_rebalance(self) -> None:
        for event in self.consumer.rebalances():
            if event.kind is RebalanceKind.ASSIGNED:
                self._on_assigned(event.partitions)
            else:
                # Lost (evicted): another member may own these already; do not commit for them.
                self._on_revoked(event.partitions, commit=event.kind is RebalanceKind.REVOKED)

    def _on_revoked(self, revoked: Set[TopicPartition], *, commit: bool) -> None:
        """Flush → checkpoint → commit the revoked partitions (the backend holds the group back
        until the next poll), then forget their buffers."""
        revoked = frozenset(TopicPartition(tp.topic, tp.partition) for tp in revoked)
        offsets: dict[TopicPartition, int] = {}
        self._await_write()  # nothing is committed beyond what is durable
        if self.crashed:
            commit = False  # neither checkpoint nor commit anything after a crash
        elif revoked and self.dirty:
            # The model learned the window: make it durable (also for lost partitions, whose
            # offsets are not committed).
            try:
                saved = self._flush_and_save("revocation")
            except Exception:
                log.exception("checkpoint on revocation failed")
                saved = False
            if saved:
                offsets = self._commit_offsets(revoked)
            else:
                self.needs_rollback = True
        elif revoked and not self.stop_event.is_set():
            offsets = self._commit_offsets(revoked)
        if offsets and commit:
            self.checkpointer.commit(self.consumer, offsets, self._grace_ms(5000))
        for tp in revoked:
            self.pending.pop(tp, None)
            self.pending_t0.pop(tp, None)
            self.cuts.pop(tp, None)
            self.newly_assigned.discard(tp)
        self.owned = self.owned - revoked
        for tp in revoked:
            self._metric("remove_lag", tp.topic, tp.partition)
        self._publish_health()
        log.info(
            "partitions %s: %s",
            "revoked" if commit else "lost",
            sorted(f"{t.topic}-{t.partition}" for t in revoked),
        )

    def _on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assigned = frozenset(TopicPartition(tp.topic, tp.partition) for tp in assigned)
        self.owned = self.owned | assigned
        self.newly_assigned |= assigned
        self._publish_health()
        log.info("partitions assigned: %s", sorted(f"{t.topic}-{t.partition}" for t in assigned))

    def _seek_assigned(self, committed: dict[TopicPartition, int | None]) -> set[TopicPartition]:
        """Seek newly assigned partitions to where this model stands; returns the partitions
        sought (records polled for them before the seek must be dropped)."""
        sought: set[TopicPartition] = set()
        for tp in sorted(committed):
            if tp not in self.owned:
                continue
            ours = self.next_offsets.get((tp.topic, tp.partition))
            # committed > ours: another member applied that range to its own model meanwhile —
            # unless the restore fell back past a corrupt checkpoint (then re-apply its window).
            if (tp.topic, tp.partition) in self.replay_from_checkpoint:
                self.replay_from_checkpoint.discard((tp.topic, tp.partition))
                known = [ours]
            else:
                known = [o for o in (ours, committed[tp]) if o is not None]
                first = self.start_offsets.get((tp.topic, tp.partition))
                if not known and first is not None:
                    # Read here before, nothing applied or committed since: its buffer was dropped
                    # at the revocation, and a client may keep the position of a partition it gets
                    # back, past those records (kafka-python in the eager protocol).
                    known = [first]
            self.pending.pop(tp, None)
            if known:
                self.consumer.seek(tp, max(known))
                sought.add(tp)
                log.info(
                    "%s-%d: resuming at %d (checkpoint %s, committed %s)",
                    tp.topic,
                    tp.partition,
                    max(known),
                    ours,
                    committed[tp],
                )
            else:
                log.info(
                    "%s-%d: no checkpoint or commit, starting from %s",
                    tp.topic,
                    tp.partition,
                    self.k.auto_offset_reset,
                )
        return sought

    # -- main loop ---------------------------------------------------------------------
    def _poll_timeout_ms(self) -> int:
        """The poll's longest wait: short while a checkpoint is being written or due soon, so
        its commit does not wait for records that may not come."""
        timeout = self.k.poll_timeout_ms
        if self.writing is not None:
            return min(timeout, 5)
        if self.dirty:
            due = self.cfg.checkpoint.every_seconds - (time.monotonic() - self.last_checkpoint)
            return min(timeout, max(1, int(due * 1000)))
        return timeout

    def _step(self) -> None:
        if self.writing is not None and self.caught_up:
            # Caught up, so nothing is waiting: let the write finish (the writer thread has the
            # interpreter to itself meanwhile) and commit at once, rather than after the next
            # chunk.  At most one cadence: a stalled disk must not stop the stream.
            self.writing.pending.wait(self.cfg.checkpoint.every_seconds)
            self._commit_if_durable()
        polled = self.consumer.poll(self._poll_timeout_ms(), self.k.max_poll_records)
        t_poll = time.monotonic()
        self.caught_up = sum(len(m) for m in polled.values()) < self.k.max_poll_records
        self._on_rebalance()
        if self.needs_rollback:
            self._rollback()
        fresh, self.newly_assigned = self.newly_assigned, set()
        if fresh:
            committed = self.consumer.committed(sorted(fresh), self.k.request_timeout_ms)
            sought = self._seek_assigned(committed)
            # Records fetched before the seek may start elsewhere: drop them, they are re-fetched.
            polled = {tp: m for tp, m in polled.items() if tp not in sought}
        for tp, msgs in polled.items():
            if tp not in self.owned or not msgs:
                continue
            buf = self.pending[tp]
            expected = buf[-1].offset + 1 if buf else self.next_offsets.get((tp.topic, tp.partition))
            if expected is not None and msgs[0].offset < expected:
                msgs = [m for m in msgs if m.offset >= expected]  # never apply a record twice
                if not msgs:
                    continue
            if not buf:
                self.pending_t0[tp] = t_poll
            if expected is None:
                self.start_offsets.setdefault((tp.topic, tp.partition), msgs[0].offset)
            buf.extend(msgs)
        if self.reader is not None:
            self._add_reference(self.reader.poll(0))
        self._commit_if_durable()
        for tp in list(self.pending):
            self._drain(tp, t_poll)
        self._commit_if_durable()
        if (
            self.dirty
            and self.writing is None
            and (
                self.send_error is not None
                or self.events_since_checkpoint >= self.cfg.checkpoint.every_events
                or time.monotonic() - self.last_checkpoint >= self.cfg.checkpoint.every_seconds
            )
        ):
            self._checkpoint_in_background()
        if t_poll - self._last_housekeeping >= 1.0:
            self._last_housekeeping = t_poll
            self._housekeeping()
        self._publish_summary()

    def _summary_key(self) -> tuple[int, ...]:
        """What every change of the engine's summary changes with: the engine (a restore or a
        snapshot swap installs another), its consumed and reference counts, its policy and model
        versions, and the rollbacks (which restore an older state into the same engine)."""
        e = self.engine
        c = e.counters
        return (id(e), c.consumed, c.reference_events, e.policy.version, e.model_version, self.rollbacks)

    def _publish_summary(self) -> None:
        """Replace :attr:`summary` when the engine changed, at most every ``_SUMMARY_EVERY_S``
        (40–80 µs of counters, learner metrics and curvature health: every step paid it, about
        one a chunk, 0.3–0.4 µs an event); a change is published by the first step after that."""
        key = self._summary_key()
        if key != self._summary_key_published:
            now = time.monotonic()
            if now - self._summary_published_at >= _SUMMARY_EVERY_S:
                self.summary = self.engine.summary()
                self._summary_key_published, self._summary_published_at = key, now

    def _add_reference(self, raws: list[bytes | None]) -> None:
        if raws:
            with self._changing_model():
                rejects = self.engine.add_reference(raws)
            if rejects:
                log.warning(
                    "reference topic: %d invalid events ignored (first: %s)",
                    len(rejects),
                    rejects[0].reason.value,
                )
            if self.reader is not None:
                self.reference_offsets = dict(self.reader.offsets)
            self.dirty = True

    def _can_process(self) -> bool:
        # Outputs must be producible before a chunk may change the model.
        return self.send_error is None and time.monotonic() >= self._resume_at and self._ensure_producer()

    def _drain(self, tp: TopicPartition, t_poll: float) -> None:
        """Process every ready offset-aligned chunk buffered for ``tp``."""
        buf = self.pending.get(tp)
        if not buf or not self._can_process():
            return
        offsets = list(map(_OFFSET, buf))
        B, cuts = self.k.process_batch_size, self.cuts.get(tp, ())
        hw = self.consumer.highwater(tp)
        chunks = plan_chunks(offsets, B, cuts, None, hw)
        if (not chunks or chunks[-1].stop < len(offsets)) and hw is not None:
            # A tail waits for more records unless the partition is caught up: the position, not
            # the last record, decides (an offset may hold no record: transaction markers).
            pos = self.consumer.position(tp)
            if pos is not None and pos > offsets[-1] + 1:
                chunks = plan_chunks(offsets, B, cuts, pos, hw)
        done = 0
        rollbacks = self.rollbacks
        for chunk in chunks:
            if done and not self._can_process():
                break
            msgs = buf[chunk.start : chunk.stop]
            done = chunk.stop
            if chunk.short:
                self.cuts[tp].add(msgs[-1].offset + 1)
            self._process(tp, msgs, self.pending_t0.get(tp, t_poll))
            self.pending_t0[tp] = t_poll
            self._commit_if_durable()
            if self.rollbacks != rollbacks:
                return  # the window was rolled back: the buffers are gone, the records re-fetched
        if done:
            del buf[:done]
        if not buf:
            self.pending.pop(tp, None)

    def _process(self, tp: TopicPartition, msgs: list[ConsumedRecord], t_poll: float) -> None:
        t0 = time.perf_counter()
        key = (tp.topic, tp.partition)
        with self._changing_model():
            result = self._apply_chunk(tp, msgs)
            self.next_offsets[key] = msgs[-1].offset + 1
        # A replayed window is not new input: count every offset once in this process.
        first_new = self.counted.get(key, -1)
        fresh = np.fromiter(map(_OFFSET, msgs), dtype=np.int64, count=len(msgs)) >= first_new
        self.counted[key] = max(first_new, msgs[-1].offset + 1)
        self.events_since_checkpoint += len(msgs)
        self.dirty = True
        self.uncommitted_polls.append(t_poll)
        self.batches += 1
        counts = result.counts()
        log.debug("%s-%d batch of %d: %s", tp.topic, tp.partition, len(msgs), counts, extra=counts)
        if result.rejects:
            reasons: dict[str, int] = defaultdict(int)
            for r in result.rejects:
                reasons[r.reason.value] += 1
            log.warning(
                "%s-%d: %d event(s) dead-lettered: %s",
                tp.topic,
                tp.partition,
                len(result.rejects),
                dict(reasons),
                extra={"dead_letter_reasons": dict(reasons)},
            )
        if result.alarm:
            log.warning(
                "quarantine rate above its cap (%.2f): drift or a broken producer?",
                self.engine.policy.quarantine_rate,
            )
        self._metric("observe_batch", result, self._summary_cached(), time.perf_counter() - t0, fresh)

    def _emit(self, tp: TopicPartition, msgs: list[ConsumedRecord], result: BatchResult) -> None:
        """Produce the chunk's outputs (the emitter's job; one seam for fault injection)."""
        self.emitter.emit(tp, msgs, result)

    def _ensure_producer(self) -> bool:
        """A producer to send outputs with, or False (retried at most once a second)."""
        if self.producer is not None:
            return True
        now = time.monotonic()
        if now - self._producer_attempt < 1.0:
            return False
        self._producer_attempt = now
        if self.broker is None:  # not started
            return False
        try:
            self.producer = self.broker.producer()
        except Exception as exc:
            log.warning("cannot create the output producer (will retry): %s", exc)
            return False
        return True

    def _output_topics(self) -> list[str]:
        k = self.k
        return [
            t for t in (k.quarantine_topic, k.dead_letter_topic, k.accepted_topic, k.decisions_topic) if t
        ]

    # -- checkpoint protocol ---------------------------------------------------------------
    def _flush_and_save(self, reason: str, *, background: bool = False) -> Path | PendingCheckpoint | None:
        """Steps 1–2: outputs acknowledged, then the checkpoint made durable (with
        ``background``: its state captured and handed to the writer thread).  Returns None
        (nothing written) if the outputs were not acknowledged or the engine is torn."""
        if self.crashed or self.torn:
            log.warning("no checkpoint at %s: the model holds a partly processed window", reason)
            return None
        self._await_write()
        t0 = time.perf_counter()
        flush_ms = self._grace_ms(int(self.k.flush_timeout_seconds * 1000))
        path = self.checkpointer.flush_and_save(
            self.engine,
            self.next_offsets,
            self.reference_offsets,
            reason,
            flush_ms / 1000,
            self._checkpoint_extra,
            background=background,
        )
        if path is None:
            self._set_broker_up(False)
            return None
        self.dirty = False
        self.cuts.clear()  # the window is durable: it is never replayed
        self.replays = 0
        self.last_failure = ""
        self.events_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        if not background:
            self._metric("observe_checkpoint", time.perf_counter() - t0, time.time())
        c = self.engine.counters
        log.info(
            "checkpoint %s (%s): %d consumed, %d accepted, %d quarantined, %d dead-lettered",
            (path.path if isinstance(path, PendingCheckpoint) else path).name,
            reason,
            c.consumed,
            c.accepted,
            c.quarantined,
            c.dead_lettered,
            extra={
                "consumed": c.consumed,
                "accepted": c.accepted,
                "quarantined": c.quarantined,
                "dead_lettered": c.dead_lettered,
            },
        )
        return path

    def _commit_offsets(self, tps: Set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        tps = self.owned if tps is None else tps
        return {
            tp: self.next_offsets[(tp.topic, tp.partition)]
            for tp in tps
            if (tp.topic, tp.partition) in self.next_offsets
        }

    def _checkpoint_in_background(self) -> None:
        """The interval checkpoint: flush, capture the state and hand it to the writer thread;
        :meth:`_committed_write` commits once it is durable.  The loop goes on meanwhile."""
        t0 = time.perf_counter()
        polls = list(self.uncommitted_polls)
        pending = self._flush_and_save("interval", background=True)
        if not isinstance(pending, PendingCheckpoint):
            if not self.stop_event.is_set():
                self._rollback()
            return
        self.uncommitted_polls = self.uncommitted_polls[len(polls) :]
        self.writing = _Writing(pending, self._commit_offsets(), polls, t0)

    def _await_write(self) -> None:
        """Wait until the interval checkpoint being written is durable (its error raised here, on
        the loop thread, as a synchronous write's would be).  Its offsets are committed with the
        next commit."""
        w, self.writing = self.writing, None
        if w is None:
            return
        w.pending.result()
        self.uncommitted_polls[:0] = w.polls

    def _commit_if_durable(self) -> None:
        """Commit the interval checkpoint's offsets as soon as its write is done: checked after
        the poll and between chunks, not once a step, so a commit does not wait for the rest of
        the step (a chunk takes tens of milliseconds under load)."""
        if self.writing is not None and self.writing.pending.done():
            self._committed_write()

    def _committed_write(self) -> None:
        """The interval checkpoint is durable: commit its offsets — only with every output
        produced so far acknowledged (the commit never runs ahead of an output), else the window
        since is rolled back to it."""
        w, self.writing = self.writing, None
        assert w is not None
        w.pending.result()
        self._metric("observe_checkpoint", time.perf_counter() - w.started, time.time())
        flush_ms = self._grace_ms(int(self.k.flush_timeout_seconds * 1000))
        if not self.checkpointer.settle(flush_ms / 1000):
            self._set_broker_up(False)
            self.uncommitted_polls[:0] = w.polls
            if not self.stop_event.is_set():
                self._rollback()
            return
        self._after_checkpoint()
        if w.offsets and not self.checkpointer.commit(
            self.consumer, w.offsets, self._grace_ms(self.k.request_timeout_ms)
        ):
            self.uncommitted_polls[:0] = w.polls  # committed with the next checkpoint
            return
        now = time.monotonic()
        for t in w.polls:
            self._metric("observe_commit", now - t)

    def _checkpoint(self, *, force: bool = False, reason: str = "interval") -> bool:
        """Flush → checkpoint → commit, synchronously (shutdown, tests).  Returns False if the
        window had to be rolled back."""
        self._await_write()
        if not self.dirty and not force:
            return True
        if self.dirty and not self._flush_and_save(reason):
            if not self.stop_event.is_set():  # stopping: the next start replays it from disk
                self._rollback()
            return False
        self._after_checkpoint()
        offsets = self._commit_offsets()
        polls, self.uncommitted_polls = self.uncommitted_polls, []
        if offsets and not self.checkpointer.commit(
            self.consumer, offsets, self._grace_ms(self.k.request_timeout_ms)
        ):
            return True
        now = time.monotonic()
        for t in polls:
            self._metric("observe_commit", now - t)
        return True

    def _rollback(self) -> None:
        """Forget the un-checkpointed window: restore the latest checkpoint and replay it after a
        back-off; more than ``kafka.max_window_replays`` replays in a row raise
        :class:`ReplayLimitError` (the service stops rather than loop for ever)."""
        self.needs_rollback = False
        self.replays += 1
        self.rollbacks += 1
        self._await_write()  # the checkpoint being written is the one to restore
        self._restore()
        if self.replays > self.k.max_window_replays:
            window = ", ".join(
                f"{t}-{p}@{self.next_offsets.get((t, p), self.start_offsets.get((t, p), '?'))}"
                for t, p in sorted((tp.topic, tp.partition) for tp in self.owned)
            )
            raise ReplayLimitError(
                f"the window starting at {window or 'the last checkpoint'} was rolled back "
                f"{self.replays} times in a row (kafka.max_window_replays = {self.k.max_window_replays}); "
                f"last failure: {self.last_failure or repr(self.send_error)}"
            )
        delay = min(
            self.k.replay_backoff_seconds * 2 ** (self.replays - 1), self.k.replay_backoff_max_seconds
        )
        self._resume_at = time.monotonic() + delay
        log.warning(
            "replaying the window in %.1fs (replay %d of at most %d)",
            delay,
            self.replays,
            self.k.max_window_replays,
        )
        self.pending.clear()
        self.pending_t0.clear()
        self.uncommitted_polls.clear()
        self.dirty = False
        self.torn = False  # the engine is the checkpoint's again
        self.events_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.emitter.discard()  # re-created when the next chunk is processed
        if self.reader is not None:
            self.reader.rewind(self.reference_offsets)
        for tp in self.owned:
            key = (tp.topic, tp.partition)
            off = self.next_offsets.get(key, self.start_offsets.get(key))
            if off is not None:
                self.consumer.seek(tp, off)
            else:
                self.newly_assigned.add(tp)

    # -- housekeeping --------------------------------------------------------------------
    def _set_broker_up(self, up: bool) -> None:
        if up != self.broker_up:
            (log.info if up else log.warning)("broker %s", "reachable again" if up else "unreachable")
        self.broker_up = up
        self._metric("set_broker_up", up)

    def _housekeeping(self) -> None:
        self._set_broker_up(self.consumer.reachable())
        if self.reader is not None:
            self.reader.check_recreated()
        outcome = self.reloader.poll()
        if outcome is not None:
            if outcome.ok and outcome.policy is not None:
                version = self.engine.set_policy(outcome.policy)
                log.info("routing policy version %d in force", version)
                self._metric("policy_reloaded", version, True, outcome.policy)
            elif not outcome.ok:
                self._metric("policy_reloaded", self.engine.policy.version, False)
        for tp in sorted(self.owned):
            lag = self._lag.check(self.consumer, tp)
            if lag is None:
                continue
            if lag.past_end:
                self._reset_partition(tp, lag.position, lag.highwater)
            if lag.lag is not None:
                self._metric("set_lag", tp.topic, tp.partition, lag.lag)
        # Model gauges must follow the model while the stream is idle too, not only per batch.
        self._metric("update_summary", self.engine.summary())
        self._publish_health()

    def _reset_partition(self, tp: TopicPartition, pos: int, hw: int) -> None:
        log.warning(
            "%s-%d: position %d is past the end of the partition (%d): topic re-created or truncated; "
            "resetting to %s",
            tp.topic,
            tp.partition,
            pos,
            hw,
            self.k.auto_offset_reset,
        )
        self.pending.pop(tp, None)
        self.cuts.pop(tp, None)
        # The old offsets mean nothing in the new partition; the model keeps what it learned.
        self.next_offsets.pop((tp.topic, tp.partition), None)
        self.start_offsets.pop((tp.topic, tp.partition), None)
        self.counted.pop((tp.topic, tp.partition), None)
        if self.k.auto_offset_reset == "earliest":
            self.consumer.seek_to_beginning(tp)
        else:
            self.consumer.seek(tp, hw)


def run_service(cfg: AppSettings, config_path: Path | None = None) -> int:
    """Build and run a service (what ``stream-influence run`` calls).  The checkpoint directory
    is created by the first checkpoint, so a start that fails early leaves nothing behind."""
    return Service(cfg, config_path=config_path).run()
