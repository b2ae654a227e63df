"""The Kafka consumer service behind ``stream-influence run``.

One process = one consumer in the group + one engine (its own model) + one checkpoint
directory.  The loop, per poll:

1. ``consumer.poll`` → records are buffered per partition;
2. new reference events (read outside the group) go to ``engine.add_reference`` first;
3. every *ready* chunk is processed: chunks are aligned to input offsets
   (``offset // kafka.process_batch_size``) so a replay cuts the same batches as the original
   run; a partial chunk is processed once the partition is caught up with its high watermark;
4. each chunk's dead letters, quarantined (and optionally accepted / decision) records are
   produced, keyed by event id (dead letters keep their original key);
5. every ``checkpoint.every_events`` events or ``checkpoint.every_seconds``: **flush the
   producer → write the checkpoint atomically (engine state + next input offsets) → commit
   those offsets to Kafka**.

On start and on every assignment each partition is sought to the offset the model has reached
(``max(checkpoint offset, committed offset)``), so an event is applied to a model once, however
the process died.  See docs/architecture.md for the guarantees step by step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from kafka import TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import IllegalStateError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from stream_influence.config import AppSettings
from stream_influence.core.engine import BatchResult, InfluenceEngine
from stream_influence.errors import ConfigError, OutputError, ReplayLimitError
from stream_influence.io import kafka_io
from stream_influence.observability.metrics import MetricsServer, ServiceMetrics
from stream_influence.service.checkpoint import Checkpoint, CheckpointStore
from stream_influence.service.reload import PolicyReloader

__all__ = ["Service"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Sent:
    """An output in flight, with the input message it stands for (to dead-letter it instead if
    the broker refuses this one record)."""

    future: Any
    record: kafka_io.OutputRecord
    tp: TopicPartition
    message: Any
    #: The event's one destination (dead letter / quarantine copy), not an audit copy.
    destination: bool


def _transient(exc: BaseException | None) -> bool:
    """Broker trouble (retry the window) rather than a refusal of this one record."""
    return isinstance(exc, KafkaTimeoutError | IllegalStateError) or bool(getattr(exc, "retriable", False))


class _Listener(AsyncConsumerRebalanceListener):
    """Rebalance hooks.  kafka-python runs them on its IO thread, where blocking consumer calls
    are not allowed: the revoke hook checkpoints and awaits the commit; the assign hook only
    records the partitions, and the main thread seeks them right after ``poll`` returns."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Any) -> None:
        offsets = self.service._on_revoked(set(revoked), commit=True)
        if offsets:
            coordinator = self.service.consumer._coordinator  # no public async commit in kafka-python
            try:
                await coordinator._commit_offsets_sync_async(offsets, timeout_ms=self.service._grace_ms(5000))
            except Exception as exc:
                log.warning("commit on revocation failed (the checkpoint still holds them): %s", exc)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.service._on_assigned(set(assigned))

    async def on_partitions_lost(self, lost: Any) -> None:
        # Evicted: another member may own these already; do not commit for them.
        self.service._on_revoked(set(lost), commit=False)


class Service:
    """``stream-influence run``: see the module docstring."""

    def __init__(
        self, cfg: AppSettings, *, config_path: Path | None = None, install_signals: bool = True
    ) -> None:
        self.cfg = cfg
        # Policy hot reload: SIGHUP or a change of the config file (only engine.policy is hot).
        self.reloader = PolicyReloader(config_path, cfg.engine.policy)
        self.k = cfg.kafka
        self.install_signals = install_signals
        self.store = CheckpointStore(cfg.checkpoint.directory, cfg.checkpoint.keep)
        self.lock = (
            threading.RLock()
        )  # engine, buffers and offsets; never held across a blocking consumer call
        self.stop_event = threading.Event()
        self.engine = InfluenceEngine(cfg.engine)
        self.next_offsets: dict[tuple[str, int], int] = {}  # first offset not applied to the model
        # Where a partition unknown to checkpoints and commits started (auto_offset_reset), so a
        # rollback before its first checkpoint can go back there.
        self.start_offsets: dict[tuple[str, int], int] = {}
        self.reference_offsets: dict[int, int] = {}
        # Partitions whose restored offsets win over the committed ones: the restore fell back
        # past a corrupt checkpoint whose window was committed but is lost with it.
        self.replay_from_checkpoint: set[tuple[str, int]] = set()
        self.outputs: dict[str, int] = defaultdict(int)
        self.pending: dict[TopicPartition, list[Any]] = defaultdict(list)
        self.pending_t0: dict[TopicPartition, float] = {}
        # Ends of the tail chunks cut short (partition caught up) since the last checkpoint: a
        # replay of the window cuts there again, so it batches — and decides — as the first try.
        self.cuts: dict[TopicPartition, set[int]] = defaultdict(set)
        # Replaced, never changed in place: ready() reads it on the metrics thread without the lock.
        self.owned: frozenset[TopicPartition] = frozenset()
        self.newly_assigned: set[TopicPartition] = set()
        self.dirty = False
        # True while a chunk (or reference batch) is being applied: an exception then leaves the
        # engine half-updated, and such a state must never reach a checkpoint.
        self.torn = False
        self.replays = 0  # consecutive rollbacks of the current window
        self._resume_at = 0.0  # back-off: no chunk is processed before this (monotonic) time
        self.last_failure = ""  # the latest output failure, named by source topic-partition@offset
        # First offset of each partition not yet counted in the metrics (a replay is not new input).
        self.counted: dict[tuple[str, int], int] = {}
        self.events_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.uncommitted_polls: list[float] = []  # poll times of chunks not committed yet
        self.inflight: list[_Sent] = []
        self.needs_rollback = False
        self.broker_up = True
        self._past_end = kafka_io.PastEnd()
        self._summary: dict[str, Any] = {}
        self._summary_at = 0.0
        self._last_housekeeping = 0.0
        self.metrics: Any = None
        self.metrics_server: Any = None
        self.reader: kafka_io.ReferenceReader | None = None
        self.consumer: Any = None
        self.producer: Any = None  # (re)built lazily: building one blocks while the broker is down
        self._producer_attempt = 0.0
        self.send_error: BaseException | None = None  # an output of this window could not be sent
        self.batches = 0
        self.crashed = False
        self._stop_deadline = float("inf")

    @contextlib.contextmanager
    def _changing_model(self) -> Iterator[None]:
        """Marks the engine torn until the block completes (an exception leaves it torn)."""
        self.torn = True
        yield
        self.torn = False

    # -- lifecycle ---------------------------------------------------------------------
    def request_stop(self, reason: str = "requested") -> None:
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
            if self.stop_event.is_set():
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(1)
            self.request_stop(signal.Signals(signum).name)
            # Safety net: a stop that overruns the grace period must not hang a deployment.
            grace = self.cfg.shutdown_grace_seconds
            t = threading.Timer(grace, self._overrun, args=(grace,))
            t.daemon = True
            t.start()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: self.reloader.request())

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
            self.outputs = defaultdict(int)
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
        self.outputs = defaultdict(int, ck.outputs)
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

    def _apply_chunk(self, tp: TopicPartition, msgs: list[Any]) -> BatchResult:
        """Apply one offset-aligned chunk to the engine and queue its outputs."""
        result = self.engine.process([m.value for m in msgs])
        self._emit(tp, msgs, result)
        return result

    def _may_process(self) -> bool:
        """False holds buffered chunks back (a score worker without a fresh enough snapshot)."""
        return True

    def _checkpoint_extra(self) -> dict[str, Any]:
        """Role state saved in the checkpoint with the engine (same atomic file)."""
        return {}

    def _after_checkpoint(self) -> None:
        """Called (lock held) after a checkpoint is durable, before its offsets are committed."""

    def _subscribe(self) -> None:
        """Join the consumer group on the input topic (partitions come through the listener)."""
        self.consumer.subscribe([self.k.topic], listener=_Listener(self))

    def _trust_reference(self) -> None:
        # Every engine installed (start-up or rollback, checkpoint or empty): with a reference
        # topic the stream never defines a class, even before the trusted set arrives.
        if self.k.reference_topic:
            self.engine.trust_reference_labels()

    def run(self) -> int:
        """Consume until stopped; returns the process exit code."""
        if self.install_signals and threading.current_thread() is threading.main_thread():
            self._install_signals()
        # A directory with no usable checkpoint refuses before Kafka is contacted; then an
        # unreachable broker fails in seconds with its cause, not after every client's timeout.
        ck = self.store.latest(self.cfg.engine)
        kafka_io.check_broker(self.k)
        self._restore(ck, loaded=True)
        self._start_metrics()
        self._ensure_producer()
        if self.k.create_output_topics:
            kafka_io.ensure_topics(self.k, self._output_topics())
        if self.k.reference_topic:
            self.reader = kafka_io.ReferenceReader(self.k, self.k.reference_topic, self.reference_offsets)
            backlog = self.reader.read_backlog(self.k.reference_backlog_timeout_seconds)
            self._add_reference(backlog)
            log.info("reference topic %s: %d events read", self.k.reference_topic, len(backlog))
        elif self.cfg.engine.reference.seed_from_stream == 0 and self.engine.reference.size == 0:
            log.warning(
                "no kafka.reference_topic and engine.reference.seed_from_stream is 0: the reference "
                "set stays empty, so routing stays in warm-up and accepts everything; configure one"
            )
        self.consumer = kafka_io.build_consumer(self.k)
        self._subscribe()
        log.info("consuming %s as group %s", self.k.topic, self.k.group_id)
        gave_up = False
        try:
            while not self.stop_event.is_set():
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
        code = 0
        try:
            final = self.consumer is not None and not self.crashed
            if final and not self._checkpoint(force=True, reason="shutdown"):
                log.error(
                    "final checkpoint not written: the next start replays the window since the last one"
                )
                self.crashed = True  # closing the consumer must not try again from the same state
                code = 1
        except Exception:
            log.exception("final checkpoint failed")
            self.crashed = True  # closing the consumer must not try again from the same state
            code = 1
        closers: list[tuple[str, Any, Callable[[Any], Any]]] = [
            # close() leaves the group, so the partitions move to other members at once.
            ("consumer", self.consumer, lambda c: c.close(autocommit=False, timeout_ms=self._grace_ms(5000))),
            ("producer", self.producer, lambda p: p.close(timeout=self._grace_ms(5000) / 1000)),
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

    # -- metrics -----------------------------------------------------------------------
    def _start_metrics(self) -> None:
        m = self.cfg.metrics
        self.metrics = ServiceMetrics(engine_settings=self.cfg.engine)
        self.metrics.count_checkpoint_fallbacks(self.store.fallback_counts)
        self.metrics.set_policy(self.engine.policy.settings, self.engine.policy.version)
        self.metrics.update_summary(self.engine.summary())
        if m.enabled:
            self.metrics_server = MetricsServer(m.host, m.port, self.metrics.registry, self.ready)
            try:
                self.metrics_server.start()
            except OSError as exc:
                self.metrics_server = None
                raise ConfigError(
                    f"cannot serve metrics on {m.host}:{m.port}: {exc.strerror or exc} "
                    "(set metrics.port to a free port, 0 for any, or metrics.enabled: false)"
                ) from exc
            log.info("metrics on http://%s:%d/metrics", m.host, self.metrics_server.port)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """/readyz: partitions assigned, broker reachable, model warm."""
        owned = sorted(f"{tp.topic}-{tp.partition}" for tp in self.owned)  # a snapshot: see __init__
        detail: dict[str, Any] = {
            "assigned_partitions": owned,
            "broker_reachable": self.broker_up,
            "model_warm": self.engine.warm,
        }
        if not self.engine.warm:
            detail["not_warm_reason"] = self.engine.not_warm_reason()
        return bool(owned) and self.broker_up and self.engine.warm, detail

    def _metric(self, name: str, *args: Any) -> None:
        if self.metrics is not None:
            try:
                getattr(self.metrics, name)(*args)
            except Exception:  # metrics must never stop the stream
                log.debug("metrics.%s failed", name, exc_info=True)

    def _summary_cached(self) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._summary_at >= 1.0:
            self._summary = self.engine.summary()
            self._summary_at = now
        return self._summary

    # -- rebalance (IO thread) ------------------------------------------------------------
    def _on_revoked(
        self, revoked: set[TopicPartition], *, commit: bool
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        with self.lock:
            offsets: dict[TopicPartition, OffsetAndMetadata] = {}
            if self.crashed:
                # consumer.close() after a crash runs this hook: neither checkpoint nor commit
                # anything; the next start replays from the last durable checkpoint.
                commit = False
            elif revoked and self.dirty:
                try:
                    saved = self._flush_and_save("revocation")
                except Exception:
                    log.exception("checkpoint on revocation failed")
                    saved = False
                if saved:
                    offsets = self._commit_offsets(revoked)
                else:
                    self.needs_rollback = True
            elif revoked and commit and not self.stop_event.is_set():  # stopping: already committed
                offsets = self._commit_offsets(revoked)
            for tp in revoked:
                self.pending.pop(tp, None)
                self.pending_t0.pop(tp, None)
                self.cuts.pop(tp, None)
                self.newly_assigned.discard(tp)
            self.owned = self.owned - revoked
            for tp in revoked:
                self._metric("remove_lag", tp.topic, tp.partition)
            log.info("partitions revoked: %s", sorted(f"{t.topic}-{t.partition}" for t in revoked))
            return offsets if commit else {}

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        with self.lock:
            self.owned = self.owned | assigned
            self.newly_assigned |= assigned
            log.info("partitions assigned: %s", sorted(f"{t.topic}-{t.partition}" for t in assigned))

    def _committed(self, tps: set[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Committed offsets (main thread, lock not held: this blocks on the IO thread)."""
        out: dict[TopicPartition, int | None] = {}
        for tp in tps:
            try:
                out[tp] = self.consumer.committed(tp, timeout_ms=self.k.request_timeout_ms)
            except Exception as exc:
                log.warning("cannot read the committed offset of %s: %s", tp, exc)
                out[tp] = None
        return out

    def _seek_assigned(self, committed: dict[TopicPartition, int | None]) -> set[TopicPartition]:
        """Seek newly assigned partitions to where this model stands (lock held); returns the
        partitions sought (records polled for them before the seek must be dropped)."""
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
    def _step(self) -> None:
        polled = self.consumer.poll(timeout_ms=self.k.poll_timeout_ms, max_records=self.k.max_poll_records)
        t_poll = time.monotonic()
        with self.lock:
            if self.needs_rollback:
                self._rollback()
            fresh, self.newly_assigned = self.newly_assigned, set()
        committed = self._committed(fresh) if fresh else {}
        with self.lock:
            if fresh:
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
            for tp in list(self.pending):
                self._drain(tp, t_poll)
        if self.dirty and (
            self.send_error is not None
            or self.events_since_checkpoint >= self.cfg.checkpoint.every_events
            or time.monotonic() - self.last_checkpoint >= self.cfg.checkpoint.every_seconds
        ):
            self._checkpoint(reason="interval")
        if t_poll - self._last_housekeeping >= 1.0:
            self._last_housekeeping = t_poll
            self._housekeeping()

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

    def _drain(self, tp: TopicPartition, t_poll: float) -> None:
        """Process every ready offset-aligned chunk buffered for ``tp``."""
        buf = self.pending.get(tp)
        B = self.k.process_batch_size
        # Outputs must be producible before a chunk may change the model.
        while (
            buf
            and self.send_error is None
            and time.monotonic() >= self._resume_at
            and self._ensure_producer()
            and self._may_process()
        ):
            end = (buf[0].offset // B + 1) * B
            end = min([c for c in self.cuts.get(tp, ()) if c > buf[0].offset] + [end])
            k = 0
            while k < len(buf) and buf[k].offset < end:
                k += 1
            ready = k < len(buf) or buf[k - 1].offset == end - 1
            if not ready:
                # Caught up: the consumer is past the chunk or at the end of the partition.  The
                # position, not the last record, decides: an offset may hold no record
                # (transaction markers, compaction).
                hw = self.consumer.highwater(tp)
                try:
                    pos = self.consumer.position(tp, timeout_ms=0)
                except Exception:  # no position yet: fall back to the last buffered record
                    pos = None
                pos = buf[-1].offset + 1 if pos is None else max(pos, buf[-1].offset + 1)
                ready = hw is None or pos >= end or pos >= hw
            if not ready:
                return
            chunk = buf[:k]
            del buf[:k]
            if chunk[-1].offset + 1 < end:
                self.cuts[tp].add(chunk[-1].offset + 1)
            self._process(tp, chunk, self.pending_t0.get(tp, t_poll))
            self.pending_t0[tp] = t_poll
        if not buf:
            self.pending.pop(tp, None)

    def _process(self, tp: TopicPartition, msgs: list[Any], t_poll: float) -> None:
        t0 = time.perf_counter()
        key = (tp.topic, tp.partition)
        with self._changing_model():
            result = self._apply_chunk(tp, msgs)
            self.next_offsets[key] = msgs[-1].offset + 1
        # A replayed window is not new input: count every offset once in this process.
        first_new = self.counted.get(key, -1)
        fresh = np.fromiter((m.offset >= first_new for m in msgs), dtype=bool, count=len(msgs))
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

    def _ensure_producer(self) -> bool:
        """A producer to send outputs with, or False (retried at most once a second)."""
        if self.producer is not None:
            return True
        now = time.monotonic()
        if now - self._producer_attempt < 1.0:
            return False
        self._producer_attempt = now
        try:
            self.producer = kafka_io.build_producer(self.k)
        except Exception as exc:
            log.warning("cannot create the output producer (will retry): %s", exc)
            return False
        return True

    def _send(
        self, rec: kafka_io.OutputRecord, tp: TopicPartition, m: Any, *, destination: bool
    ) -> str | None:
        """Queue ``rec`` (cut to the producer's size limit).  Returns why *this record* cannot be
        sent (the caller dead-letters its message), or None: queued, or broker trouble that rolls
        the whole window back."""
        if self.send_error is not None:
            return None  # this window is rolled back at the next checkpoint anyway
        try:
            # Cut before send: the producer must never raise for a size we can know.
            rec = kafka_io.fit_record(rec, int(self.producer.config["max_request_size"]))
            future = self.producer.send(rec.topic, value=rec.value, key=rec.key, headers=rec.headers)
        except (KafkaTimeoutError, IllegalStateError) as exc:  # buffer full, metadata unknown
            self.last_failure = f"{rec.topic} for {tp.topic}-{tp.partition}@{m.offset}: {exc!r}"
            log.error("cannot produce an output (%s): the window will be rolled back", self.last_failure)
            self.send_error = exc
            return None
        except Exception as exc:  # this record only: encoding, serialisation, size
            return f"{type(exc).__name__}: {exc}"
        self.inflight.append(_Sent(future, rec, tp, m, destination))
        return None

    def _dead_letter(self, tp: TopicPartition, m: Any, reason: str, detail: str) -> None:
        """The input message ``m`` to the dead-letter topic (original key, value and headers)."""
        headers = kafka_io.dead_letter_headers(m.headers, reason, detail, tp.topic, tp.partition, m.offset)
        rec = kafka_io.OutputRecord(self.k.dead_letter_topic, key=m.key, value=m.value, headers=headers)
        why = self._send(rec, tp, m, destination=True)
        if why is not None:  # e.g. an input header that cannot be re-encoded: keep only our own
            self._send_minimal_dead_letter(tp, m, f"{detail}; dead letter refused: {why}")
        self.outputs["dead_letter"] += 1
        self._metric("observe_outputs", "dead_letter", 1)

    def _send_minimal_dead_letter(self, tp: TopicPartition, m: Any, detail: str) -> None:
        """The last resort for a message whose full dead letter cannot be sent: our own headers
        only, an empty value, the original's size and SHA-256.  If even that fails, the window
        is rolled back (bounded by ``kafka.max_window_replays``): nothing is dropped silently."""
        headers = [
            *kafka_io.dead_letter_headers(
                None, kafka_io.OUTPUT_FAILED, detail, tp.topic, tp.partition, m.offset
            ),
            *kafka_io.value_proof(m.value),
        ]
        rec = kafka_io.OutputRecord(self.k.dead_letter_topic, key=None, value=b"", headers=headers)
        why = self._send(rec, tp, m, destination=True)
        if why is not None and self.send_error is None:
            self.last_failure = f"dead letter for {tp.topic}-{tp.partition}@{m.offset}: {why}"
            log.error("cannot produce even a minimal dead letter (%s)", self.last_failure)
            self.send_error = OutputError(self.last_failure)

    def _emit(self, tp: TopicPartition, msgs: list[Any], r: BatchResult) -> None:
        """Produce the chunk's outputs.  A record that cannot be built or sent dead-letters its
        own message (reason ``output_failed``); only broker trouble rolls the window back."""
        k = self.k
        topic, part = tp.topic, tp.partition
        for rej in r.rejects:
            self._dead_letter(tp, msgs[rej.index], rej.reason.value, rej.detail)
        s = r.scores
        index = r.events.index.tolist()
        failed: dict[int, str] = {}  # input index → why its quarantine copy failed
        n_q = 0
        for j in np.flatnonzero(r.quarantine).tolist():
            m = msgs[index[j]]
            headers = kafka_io.quarantine_headers(
                m.headers,
                topic,
                part,
                m.offset,
                reason=r.reasons[j],
                influence=float(s.influence[j]),
                relative_influence=float(s.relative_influence[j]),
                cosine_influence=float(s.cosine_influence[j]),
                threshold=float(r.thresholds[j]),
                policy_version=r.policy_version,
                model_version=r.model_version,
            )
            try:
                key = kafka_io.encode_key(r.events.ids[j])
                rec = kafka_io.OutputRecord(k.quarantine_topic, key=key, value=m.value, headers=headers)
            except OutputError as exc:
                why: str | None = str(exc)
            else:
                why = self._send(rec, tp, m, destination=True)
            if why is None:
                n_q += 1
                continue
            failed[index[j]] = f"quarantine copy: {why}"
            log.warning("%s-%d@%d: %s; dead-lettered instead", topic, part, m.offset, failed[index[j]])
            self._dead_letter(tp, m, kafka_io.OUTPUT_FAILED, failed[index[j]])
        if n_q:
            self.outputs["quarantine"] += n_q
            self._metric("observe_outputs", "quarantine", n_q)
        if k.accepted_topic:
            n = 0
            for j in np.flatnonzero(~r.quarantine).tolist():
                m = msgs[index[j]]
                rec = kafka_io.OutputRecord(
                    k.accepted_topic,
                    key=self._copy_key(r.events.ids[j], tp, m.offset),
                    value=m.value,
                    headers=kafka_io.source_headers(topic, part, m.offset),
                )
                self._send_copy(rec, tp, m)
                n += 1
            if n:
                self.outputs["accepted"] += n
                self._metric("observe_outputs", "accepted", n)
        if k.decisions_topic:
            for i, rec in enumerate(r.records()):
                m = msgs[i]
                if i in failed:  # the audit says where the event really went
                    rec = {
                        **rec,
                        "decision": "dead_letter",
                        "reason": kafka_io.OUTPUT_FAILED,
                        "detail": failed[i],
                    }
                key = self._copy_key(rec["id"], tp, m.offset)
                value = kafka_io.decision_value(rec, topic, part, m.offset)
                self._send_copy(
                    kafka_io.OutputRecord(k.decisions_topic, key=key, value=value, headers=[]), tp, m
                )
            self.outputs["decisions"] += len(msgs)
            self._metric("observe_outputs", "decisions", len(msgs))

    @staticmethod
    def _copy_key(event_id: str | None, tp: TopicPartition, offset: int) -> bytes:
        """Key of an audit copy: the event id, else (none, or not encodable) the source coordinates."""
        if event_id is not None:
            with contextlib.suppress(OutputError):
                return kafka_io.encode_key(event_id)
        return f"{tp.topic}-{tp.partition}-{offset}".encode()

    def _send_copy(self, rec: kafka_io.OutputRecord, tp: TopicPartition, m: Any) -> None:
        """An accepted copy or a decision record: an audit, not the event's destination, so a
        refused one is logged (the event already is in its one place) rather than dead-lettered."""
        why = self._send(rec, tp, m, destination=False)
        if why is not None:
            log.error("%s-%d@%d: no copy to %s: %s", tp.topic, tp.partition, m.offset, rec.topic, why)

    def _output_topics(self) -> list[str]:
        k = self.k
        return [
            t for t in (k.quarantine_topic, k.dead_letter_topic, k.accepted_topic, k.decisions_topic) if t
        ]

    # -- checkpoint protocol ---------------------------------------------------------------
    def _flush_and_save(self, reason: str) -> bool:
        """Steps 1–2 (lock held): outputs acknowledged, then the checkpoint made durable.  Returns
        False (nothing written) if the outputs were not acknowledged or the engine is torn."""
        if self.crashed or self.torn:
            log.warning("no checkpoint at %s: the model holds a partly processed window", reason)
            return False
        t0 = time.perf_counter()
        try:
            if self.send_error is not None:
                raise RuntimeError(f"an output could not be sent: {self.send_error!r}")
            self._flush()
            failed = [f for f in self.inflight if f.future.failed()]
            if failed and not any(_transient(f.future.exception) for f in failed):
                # The broker refused these records themselves (too large for its limit, invalid):
                # their messages go to the dead-letter topic as a minimal record instead.
                for f in failed:
                    self._refused(f)
                self.inflight = [f for f in self.inflight if not f.future.failed()]
                if self.send_error is not None:
                    raise RuntimeError(f"an output could not be sent: {self.send_error!r}")
                self._flush()
                failed = [f for f in self.inflight if f.future.failed()]
            if failed:
                f = failed[0]
                self.last_failure = (
                    f"{f.record.topic} for {f.tp.topic}-{f.tp.partition}@{f.message.offset}: "
                    f"{f.future.exception!r}"
                )
                raise RuntimeError(f"{len(failed)} output message(s) failed, first {self.last_failure}")
        except Exception as exc:
            self.last_failure = self.last_failure or repr(exc)
            log.error("outputs not acknowledged (%s): the window is rolled back to the last checkpoint", exc)
            self._set_broker_up(False)
            return False
        self.inflight.clear()
        path = self.store.save(
            self.engine,
            self.next_offsets,
            self.reference_offsets,
            dict(self.outputs),
            extra={
                "group_id": self.k.group_id,
                "topic": self.k.topic,
                "reason": reason,
                **self._checkpoint_extra(),
            },
        )
        self.dirty = False
        self.cuts.clear()  # the window is durable: it is never replayed
        self.replays = 0
        self.last_failure = ""
        self.events_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self._metric("observe_checkpoint", time.perf_counter() - t0, time.time())
        c = self.engine.counters
        log.info(
            "checkpoint %s (%s): %d consumed, %d accepted, %d quarantined, %d dead-lettered",
            path.name,
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
        return True

    def _flush(self) -> None:
        if self.producer is not None:
            self.producer.flush(timeout=self._grace_ms(int(self.k.flush_timeout_seconds * 1000)) / 1000)
        elif self.inflight:
            raise RuntimeError("no producer for the pending outputs")

    def _refused(self, f: _Sent) -> None:
        """The broker refused one output record (not broker trouble): dead-letter its message."""
        where = f"{f.tp.topic}-{f.tp.partition}@{f.message.offset}"
        why = f"{f.record.topic} refused the record: {f.future.exception!r}"
        if not f.destination:
            log.error("%s: no copy to %s", where, why)
            return
        log.warning("%s: %s; dead-lettered instead", where, why)
        was = kafka_io.header_dict(f.record.headers).get("reason", "quarantine")
        self._send_minimal_dead_letter(f.tp, f.message, f"{was}: {why}")

    def _commit_offsets(
        self, tps: Set[TopicPartition] | None = None
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        tps = self.owned if tps is None else tps
        return {
            tp: OffsetAndMetadata(self.next_offsets[(tp.topic, tp.partition)], "", -1)
            for tp in tps
            if (tp.topic, tp.partition) in self.next_offsets
        }

    def _checkpoint(self, *, force: bool = False, reason: str = "interval") -> bool:
        """Flush → checkpoint → commit.  Returns False if the window had to be rolled back."""
        with self.lock:
            if not self.dirty and not force:
                return True
            if self.dirty and not self._flush_and_save(reason):
                if not self.stop_event.is_set():  # stopping: the next start replays it from disk
                    self._rollback()
                return False
            self._after_checkpoint()
            offsets = self._commit_offsets()
            polls, self.uncommitted_polls = self.uncommitted_polls, []
        # Step 3, outside the lock: a blocking commit needs kafka-python's IO thread, which may be
        # waiting for the lock in a rebalance hook.
        if offsets:
            try:
                self.consumer.commit(offsets, timeout_ms=self._grace_ms(self.k.request_timeout_ms))
            except Exception as exc:
                # Not fatal: the checkpoint holds the offsets and wins on the next assignment.
                log.warning("offset commit failed (will be retried with the next checkpoint): %s", exc)
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
        self.inflight.clear()
        self.uncommitted_polls.clear()
        self.dirty = False
        self.torn = False  # the engine is the checkpoint's again
        self.events_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        # The idempotent producer cannot survive a broker that lost its state; a fresh one always can.
        self.send_error = None
        if self.producer is not None:
            with contextlib.suppress(Exception):
                self.producer.close(timeout=0)
        self.producer = None  # re-created when the next chunk is processed
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
        self._set_broker_up(kafka_io.broker_reachable(self.consumer))
        if self.reader is not None:
            with self.lock:
                self.reader.check_recreated()
        outcome = self.reloader.poll()
        if outcome is not None:
            if outcome.ok and outcome.policy is not None:
                with self.lock:
                    version = self.engine.set_policy(outcome.policy)
                log.info("routing policy version %d in force", version)
                self._metric("policy_reloaded", version, True, outcome.policy)
            elif not outcome.ok:
                self._metric("policy_reloaded", self.engine.policy.version, False)
        with self.lock:
            owned = list(self.owned)
        for tp in owned:
            wm = kafka_io.watermarks(self.consumer, tp)
            if wm is None:
                continue
            pos, hw = wm
            if self._past_end.check(tp, pos, hw):
                self._reset_partition(tp, pos, hw)
            if pos > hw:
                continue
            self._metric("set_lag", tp.topic, tp.partition, hw - pos)
        # Model gauges must follow the model while the stream is idle too, not only per batch.
        with self.lock:
            summary = self.engine.summary()
        self._metric("update_summary", summary)

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
        with self.lock:
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
