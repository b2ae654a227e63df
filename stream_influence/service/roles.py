"""Scale-out roles of ``stream-influence run --role score|update`` (docs/architecture.md, "Scale-out").

Both are the service of :mod:`stream_influence.service.loop` — the same offset-aligned chunks,
flush → checkpoint → commit, rollback and replay — with a different step in the middle:

- :class:`ScoreService` (N of them, the input topic's consumer group): decodes, scores and routes
  every chunk against the newest model snapshot read from the model topic, learning nothing;
  dead letters go to their topic as in the single process, and every valid event goes to the
  updates topic with its decision.  It holds chunks back while it has no
  snapshot, or has scored ``max_model_lag_versions × checkpoint.every_events`` events on the one
  it has (the staleness bound), pausing the partitions whose records it holds.
- :class:`UpdateService` (one): consumes the updates topic in its own group, skips records whose
  source offset it has already learned (a worker's replayed window), learns the rest and makes
  the quarantine copy of each one learned as quarantined (so the outputs always show the decision
  the model learned, even when a replay was decided differently)
  (:meth:`InfluenceEngine.learn_events`), checkpoints the model with its updates-topic offsets and
  the per-source-partition high-water marks (one atomic file), and publishes that file as the next
  snapshot.  It starts from the newer of its own checkpoint and the model topic's snapshot, takes
  a lease with a higher epoch than any before, and stops (exit status 3) once a newer updater's
  lease appears: fencing by epoch, the newest updater wins.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream_influence.config import AppSettings
from stream_influence.core.engine import BatchResult, InfluenceEngine
from stream_influence.core.settings import EngineSettings
from stream_influence.core.state import decode_state, restore_engine
from stream_influence.errors import CheckpointError, ConfigError
from stream_influence.io.broker import Record, TopicPartition, open_broker
from stream_influence.io.model_topic import (
    ModelTopicReader,
    ModelTopicWriter,
    Snapshot,
    SnapshotId,
    ensure_scaleout_topics,
    parse_update,
    update_record,
)
from stream_influence.io.records import OUTPUT_FAILED, ChunkHeaders
from stream_influence.observability.roles import RoleMetrics
from stream_influence.service.checkpoint import Checkpoint
from stream_influence.service.loop import Service

__all__ = [
    "FENCED_EXIT",
    "ScoreService",
    "UpdateService",
    "engine_from_snapshot",
    "role_problems",
    "run_role",
]

log = logging.getLogger(__name__)

FENCED_EXIT = 3  # exit status of an updater fenced by a newer one


def role_problems(cfg: AppSettings) -> list[str]:
    """Why ``cfg`` cannot run the split roles (empty: it can)."""
    problems = []
    if not cfg.kafka.reference_topic:
        problems.append(
            "kafka.reference_topic is required by --role score/update: the updater learns the "
            "trusted set from it and the workers route with it (without one use --role all)"
        )
    if cfg.engine.reference.seed_from_stream:
        problems.append("engine.reference.seed_from_stream must be 0 with --role score/update")
    return problems


def run_role(cfg: AppSettings, role: str, config_path: Path | None = None) -> int:
    """Run one score worker or the updater until stopped; returns the exit status."""
    problems = role_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    cls = ScoreService if role == "score" else UpdateService
    return cls(cfg, config_path=config_path).run()


def engine_from_snapshot(snapshot: Snapshot, settings: EngineSettings) -> InfluenceEngine:
    """The engine of a snapshot, verified as a checkpoint is (shapes, dtypes, finiteness, settings)."""
    return _restore_snapshot(snapshot, settings)[0]


def _restore_snapshot(snapshot: Snapshot, settings: EngineSettings) -> tuple[InfluenceEngine, dict[str, Any]]:
    where = f"model snapshot {snapshot.id.epoch}.{snapshot.id.version}"
    state, meta, tensors = decode_state(snapshot.data, where)
    return restore_engine(state, meta, tensors, where, settings)


# Headers of an updates record that its quarantine copy does not carry.
_UPDATES_ONLY = frozenset({"decision", "snapshot_epoch"})


def learned_marks(extra: dict[str, Any]) -> dict[tuple[str, int], int]:
    """The updater's per-source-partition high-water marks (next offset not learned) saved in a
    checkpoint's or snapshot's ``extra``."""
    return {
        (key.rsplit(":", 1)[0], int(key.rsplit(":", 1)[1])): int(off)
        for key, off in extra.get("applied", {}).items()
    }


def _coordinate_hash(topic: str, partition: int, offset: int) -> int:
    # Summed mod 2**64 over every learned source offset: an order-free fingerprint of "each valid
    # event once" that a double or a missing application changes.
    digest = hashlib.blake2b(f"{topic}\0{partition}\0{offset}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def applied_checksum(coordinates: Any) -> int:
    """The fingerprint :class:`UpdateService` keeps, of ``(topic, partition, offset)`` triples."""
    return sum(_coordinate_hash(t, p, o) for t, p, o in coordinates) % 2**64


# One produce request in flight per connection, spelled as each backend's client spells it.
_ONE_IN_FLIGHT = {
    "kafka-python": "max_in_flight_requests_per_connection",
    "confluent": "max.in.flight.requests.per.connection",
}


class ScoreService(Service):
    """A score worker (see the module docstring)."""

    role = "score"

    def __init__(self, cfg: AppSettings, *, config_path: Path | None = None, install_signals: bool = True):
        k = cfg.kafka
        # Records of one source partition must reach the updates topic in offset order (the
        # updater's duplicate test is a high-water mark): no reordering by producer retries.
        options = {_ONE_IN_FLIGHT[k.client]: 1, **k.client_options}
        # The updater owns the trusted set; the worker gets it inside the snapshot.
        kafka = k.model_copy(update={"reference_topic": None, "client_options": options})
        super().__init__(
            cfg.model_copy(update={"kafka": kafka}), config_path=config_path, install_signals=install_signals
        )
        self.s = cfg.scaleout
        self.models: ModelTopicReader | None = None
        self.snapshot: Snapshot | None = None
        self.events_on_snapshot = 0
        # Source partition → next offset the snapshot in use has learned / this worker has sent
        # to the updates topic: their gap is what this worker scored that the model has not learned.
        self.learned: dict[tuple[str, int], int] = {}
        self.emitted: dict[tuple[str, int], int] = {}
        self.role_metrics: RoleMetrics | None = None
        self._held_back = False
        self._bad_snapshot: SnapshotId | None = None

    @property
    def staleness_limit(self) -> int:
        return self.s.max_model_lag_versions * self.cfg.checkpoint.every_events

    def run(self) -> int:
        self.broker = self.broker or open_broker(self.k)
        self.broker.check()
        ensure_scaleout_topics(self.broker, self.s)
        self.models = ModelTopicReader(self.broker, self.s)
        try:
            self.models.read_to_end(self.k.startup_timeout_seconds)
            self.snapshot = self._usable(self.models.latest)
            return super().run()
        finally:
            self.models.close()

    def _usable(self, snapshot: Snapshot | None) -> Snapshot | None:
        return None if snapshot is None or snapshot.id == self._bad_snapshot else snapshot

    def _start_metrics(self) -> None:
        super()._start_metrics()
        self.role_metrics = RoleMetrics(self.role, self.metrics.registry)
        self._export_snapshot()

    def _restored(self, ck: Checkpoint | None) -> None:
        # The worker learns nothing: whatever was restored, it scores with the snapshot it has.
        if self.snapshot is not None:
            self._install(self.snapshot)

    def _install(self, snapshot: Snapshot) -> bool:
        try:
            engine, extra = _restore_snapshot(snapshot, self.cfg.engine)
        except CheckpointError as exc:
            log.error("model snapshot %s rejected (keeping the one in use): %s", snapshot.id, exc)
            self._bad_snapshot = snapshot.id
            return False
        engine.updater.counters = self.engine.counters  # what this worker consumed and decided
        if engine.policy.settings != self.reloader.current:
            engine.set_policy(self.reloader.current)  # this worker's configuration wins, as on restore
        self.engine = engine
        self.learned = learned_marks(extra)
        if self.snapshot is None or snapshot.id != self.snapshot.id:
            self.events_on_snapshot = 0
            if self.role_metrics is not None:
                self.role_metrics.swaps.inc()
                self.role_metrics.snapshot_bytes.set(len(snapshot.data))
            log.info("scoring with model snapshot %d.%d", snapshot.id.epoch, snapshot.id.version)
        self.snapshot = snapshot
        return True

    def _step(self) -> None:
        assert self.models is not None
        newest = self._usable(self.models.latest) if self.models.poll(0) else None
        if newest is not None and (self.snapshot is None or newest.id > self.snapshot.id):
            self._install(newest)
        if self._held_back and self._fresh():
            self._release_held()  # before the poll: the held partitions are fetched again at once
        super()._step()
        self._hold_back_if_stale()

    @property
    def unlearned(self) -> int:
        """Offsets of this worker's partitions it has scored and sent on that the snapshot in use
        has not learned yet (dead letters between them included): its staleness in events."""
        keys = {(tp.topic, tp.partition) for tp in self.owned}
        return sum(max(0, n - self.learned.get(k, 0)) for k, n in self.emitted.items() if k in keys)

    def _fresh(self) -> bool:
        # Both bounds: events scored on this snapshot, and events scored that it has not learned.
        # Versions alone do not bound staleness: the updater publishes one per checkpoint however
        # far behind the workers it is (measured: 2-3 points less recall of label flips).
        limit = self.staleness_limit
        return self.snapshot is not None and self.events_on_snapshot < limit and self.unlearned < limit

    def _can_process(self) -> bool:
        return self._fresh() and super()._can_process()

    def _hold_back_if_stale(self) -> None:
        """While no chunk may be processed, pause the partitions with buffered records: the
        records stay buffered and nothing more is fetched for them, so a long wait (the updater
        down) buffers at most what one poll returned, and nothing is fetched twice.  Seeking back
        instead re-read them every poll, and a seek can race a rebalance (docs/broker-notes.md);
        a paused partition needs no seek.  :meth:`_release_held` resumes them."""
        stale = not self._fresh()
        if stale:
            held = {tp for tp, buf in self.pending.items() if buf and tp in self.owned}
            held -= self.consumer.paused()
            if held:
                self.consumer.pause(sorted(held))
            if not self._held_back:
                log.warning(
                    "holding chunks back: %s",
                    "no model snapshot yet"
                    if self.snapshot is None
                    else f"{self.events_on_snapshot} events scored on snapshot {self.snapshot.id}, "
                    f"{self.unlearned} not learned by it (limit {self.staleness_limit}); "
                    "waiting for a newer one",
                )
        elif self._held_back:
            self._release_held()
        self._held_back = stale
        self._export_snapshot(stale)

    def _release_held(self) -> None:
        """Chunks may be processed again: resume the partitions paused while holding back (a
        rebalance meanwhile already unpaused or forgot its partitions), at their positions."""
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(sorted(paused))
        self._held_back = False

    def _export_snapshot(self, stale: bool | None = None) -> None:
        m = self.role_metrics
        if m is None:
            return
        if self.snapshot is not None:
            newest = self.models.latest if self.models is not None else None
            m.set_snapshot(
                self.snapshot.id.epoch,
                self.snapshot.id.version,
                published_at=self.snapshot.published_at,
                newest=(newest.id.epoch, newest.id.version) if newest is not None else None,
            )
        m.events_on_snapshot.set(self.events_on_snapshot)
        m.events_unlearned.set(self.unlearned)
        m.stale.set(float(not self._fresh() if stale is None else stale))

    def _publish_health(self) -> None:
        if self.snapshot is None:  # /readyz: not ready before the first snapshot
            self.health.publish(self.owned, self.broker_up, False, "waiting for the first model snapshot")
        else:
            super()._publish_health()

    def _apply_chunk(self, tp: TopicPartition, msgs: list[Record]) -> BatchResult:
        batch, rejects = self.engine.decode([m.value for m in msgs], learn=False)
        result = self.engine.score_events(batch, rejects)
        result.n_input = len(msgs)
        # Quarantine copies are the updater's: it makes them from the updates record it learns,
        # so a replayed window scored differently can never leave an event both learned and
        # copied to quarantine.
        self.emitter.emit(tp, msgs, result, quarantine_copies=False)
        self._emit_updates(tp, msgs, result)
        self.events_on_snapshot += len(batch)
        return result

    def _emit_updates(self, tp: TopicPartition, msgs: list[Record], r: BatchResult) -> None:
        """Every valid event of the chunk to the updates topic with its decision and the headers
        its quarantine copy will carry.  This record is the event's one place (the updater learns
        it and, for a quarantined event, makes the quarantine copy): one that cannot be sent
        dead-letters the event."""
        assert self.snapshot is not None
        sid, s = self.snapshot.id, r.scores
        h = ChunkHeaders(tp.topic, tp.partition, r.policy_version, sid.version)
        index = r.events.index.tolist()
        ev_msgs = [msgs[i] for i in index]
        headers = h.quarantine_many(
            [m.headers for m in ev_msgs],
            [m.offset for m in ev_msgs],
            reasons=r.reasons,
            influence=s.influence,
            relative_influence=s.relative_influence,
            cosine_influence=s.cosine_influence,
            threshold=r.thresholds,
        )
        recs = [
            update_record(self.s.updates_topic, m.value, hs, tp.topic, tp.partition, q, sid)
            for m, hs, q in zip(ev_msgs, headers, r.quarantine.tolist(), strict=True)
        ]

        def refused(j: int, why: str) -> None:
            m = ev_msgs[j]
            log.warning("%s-%d@%d: no updates record: %s", tp.topic, tp.partition, m.offset, why)
            self.emitter.dead_letter(tp, m, OUTPUT_FAILED, f"updates record: {why}", h)

        self.emitter.send_many(recs, tp, ev_msgs, destination=True, refused=refused)
        n = len(r.events)
        if n:
            key = (tp.topic, tp.partition)
            last = msgs[int(r.events.index[-1])].offset + 1
            self.emitted[key] = max(self.emitted.get(key, 0), last)
        self.emitter.count("updates", n)


class UpdateService(Service):
    """The one updater (see the module docstring)."""

    role = "update"

    def __init__(self, cfg: AppSettings, *, config_path: Path | None = None, install_signals: bool = True):
        s = cfg.scaleout
        kafka = cfg.kafka.model_copy(
            update={
                "topic": s.updates_topic,
                "group_id": s.updater_group_id,
                # Its offsets live in its checkpoint; a partition it has none for starts at 0.
                "auto_offset_reset": "earliest",
                "accepted_topic": None,
                "decisions_topic": None,
            }
        )
        super().__init__(
            cfg.model_copy(update={"kafka": kafka}), config_path=config_path, install_signals=install_signals
        )
        self.s = s
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.epoch = 0
        self.version = 0
        self.applied: dict[tuple[str, int], int] = {}  # source partition → next offset not learned
        self.checksum = 0
        self.duplicates = 0
        self.fenced = False
        self.published_seq: int | None = None
        self.models: ModelTopicReader | None = None
        self.writer: ModelTopicWriter | None = None
        self.role_metrics: RoleMetrics | None = None
        self._last_publish = float("nan")

    def run(self) -> int:
        self.broker = self.broker or open_broker(self.k)
        self.broker.check()
        ensure_scaleout_topics(self.broker, self.s)
        self.models = ModelTopicReader(self.broker, self.s)
        try:
            if not self.models.read_to_end(self.k.startup_timeout_seconds):
                raise ConfigError(f"could not read the model topic {self.s.model_topic} to its end")
            self._adopt_newer_snapshot()
            self.writer = ModelTopicWriter(self.broker, self.s, self.owner, self.k.flush_timeout_seconds)
            self.epoch = self.models.lease_epoch + 1
            self.writer.lease(self.epoch)
            log.info("updater %s holds lease epoch %d of %s", self.owner, self.epoch, self.s.model_topic)
            code = super().run()
        finally:
            self.models.close()
            if self.writer is not None:
                self.writer.close()
        return FENCED_EXIT if self.fenced else code

    def _adopt_newer_snapshot(self) -> None:
        """Install the model topic's snapshot as the newest checkpoint when it is newer than ours
        (another updater ran meanwhile, or this one starts on an empty volume)."""
        assert self.models is not None
        latest = self.models.latest
        if latest is None:
            return
        local = self.store.latest(self.cfg.engine)
        if local is not None and _snapshot_id(local) >= latest.id:
            return
        path = self.store.install(latest.data)
        self.store.load(path, self.cfg.engine)  # verify now: a bad snapshot stops the start
        log.info(
            "starting from model snapshot %d.%d of %s (newer than checkpoint %s)",
            latest.id.epoch,
            latest.id.version,
            self.s.model_topic,
            None if local is None else local.path.name,
        )

    def _start_metrics(self) -> None:
        super()._start_metrics()
        self.role_metrics = RoleMetrics(self.role, self.metrics.registry)

    def _metric(self, name: str, *args: Any) -> None:
        # The workers count decisions; the updater's own counts are in RoleMetrics.
        if name != "observe_batch":
            super()._metric(name, *args)

    def _restored(self, ck: Checkpoint | None) -> None:
        extra = ck.extra if ck is not None else {}
        self.version = int(extra.get("version", 0))
        self.applied = learned_marks(extra)
        self.checksum = int(extra.get("applied_checksum", "0"))
        self.duplicates = int(extra.get("duplicates", 0))

    def _subscribe(self) -> None:
        # Every partition of the updates topic, assigned rather than through the group: fencing
        # is the lease's job, and a group rebalance would only delay a successor.  The group id
        # still carries the commits, for lag tools.
        deadline = time.monotonic() + self.k.startup_timeout_seconds
        while not (parts := self.consumer.partitions_for(self.k.topic)):
            if time.monotonic() > deadline:
                raise ConfigError(f"the updates topic {self.k.topic} has no partitions")
            time.sleep(0.1)
        tps = {TopicPartition(self.k.topic, p) for p in parts}
        self.consumer.assign(sorted(tps))
        self._on_assigned(tps)

    def _seek_assigned(self, committed: dict[TopicPartition, int | None]) -> set[TopicPartition]:
        # The model and its offsets travel together (checkpoint or snapshot); a group commit by
        # another (fenced) updater says nothing about this model.
        return super()._seek_assigned(dict.fromkeys(committed))

    def _apply_chunk(self, tp: TopicPartition, msgs: list[Record]) -> BatchResult:
        keep: list[Record] = []
        quarantine: list[bool] = []
        duplicates = rejected = 0
        for m in msgs:
            u = parse_update(m.headers)
            if u is None:
                rejected += 1
                continue
            key = (u.topic, u.partition)
            if u.offset < self.applied.get(key, 0):
                duplicates += 1
                continue
            self.applied[key] = u.offset + 1
            self.checksum = (self.checksum + _coordinate_hash(u.topic, u.partition, u.offset)) % 2**64
            keep.append(m)
            quarantine.append(u.quarantine)
        batch, rejects = self.engine.decode([m.value for m in keep], learn=False)
        result = self.engine.learn_events(batch, np.asarray(quarantine, dtype=bool)[batch.index])
        result.n_input = len(msgs)
        self._quarantine_copies(tp, keep, batch, quarantine)
        rejected += len(rejects)
        self.duplicates += duplicates
        if rejected:
            log.error(
                "%s-%d: %d updates record(s) not learned (not ours, or not valid here%s)",
                tp.topic,
                tp.partition,
                rejected,
                f": {rejects[0].reason.value}" if rejects else "",
            )
        m = self.role_metrics
        if m is not None:
            q = int(result.quarantine.sum())
            m.applied.labels("accept").inc(len(batch) - q)
            m.applied.labels("quarantine").inc(q)
            m.duplicates.inc(duplicates)
            m.rejected.inc(rejected)
        return result

    def _quarantine_copies(
        self, tp: TopicPartition, keep: list[Record], batch: Any, quarantine: list[bool]
    ) -> None:
        """The quarantine copy of every event learned as quarantined, made from the one updates
        record learned for it: the original value with the headers the score worker computed
        (the single process's, less the updates topic's own).  Flushed before the checkpoint that
        records the event as learned, so a replay of this window re-sends identical keyed copies."""
        h = ChunkHeaders(tp.topic, tp.partition)
        rows = [(j, i) for j, i in enumerate(batch.index.tolist()) if quarantine[i]]
        q_msgs = [keep[i] for _, i in rows]
        headers = [[(k, v) for k, v in (m.headers or []) if k not in _UPDATES_ONLY] for m in q_msgs]
        failed = self.emitter.quarantine_copies(tp, q_msgs, [batch.ids[j] for j, _ in rows], headers, h)
        self.emitter.count("quarantine", len(rows) - len(failed))

    def _checkpoint_extra(self) -> dict[str, Any]:
        self.engine.prepare_snapshot()  # what workers read must match the head saved with it
        self.version += 1
        return {
            "role": self.role,
            "epoch": self.epoch,
            "version": self.version,
            "applied": {f"{t}:{p}": o for (t, p), o in sorted(self.applied.items())},
            "applied_checksum": str(self.checksum),
            "duplicates": self.duplicates,
        }

    def _step(self) -> None:
        if self.published_seq is None and self.dirty and not self.fenced:
            self._checkpoint(force=True, reason="first snapshot")  # workers are waiting for it
        super()._step()

    def _check_fenced(self) -> bool:
        assert self.models is not None
        if not self.fenced:
            self.models.poll(0)
            lease = self.models.lease
            if self.models.lease_epoch > self.epoch and lease is not None:
                self.fenced = True
                log.error(
                    "fenced: updater %s took lease epoch %d (ours %d); stopping without publishing",
                    lease.owner,
                    lease.epoch,
                    self.epoch,
                )
                if self.role_metrics is not None:
                    self.role_metrics.fenced.set(1)
                self.request_stop("fenced")
        return self.fenced

    def _housekeeping(self) -> None:
        super()._housekeeping()
        if not self._check_fenced():
            # A checkpoint held back by snapshot_every_seconds with no checkpoint after it (the
            # updater idle): publish it now, or workers waiting for it would wait forever.
            self._publish_latest()
        if self.role_metrics is not None and self._last_publish == self._last_publish:
            self.role_metrics.set_snapshot(self.epoch, self.version, published_at=self._last_publish)

    def _after_checkpoint(self) -> None:
        """Publish the checkpoint just written as the next snapshot."""
        if not self._check_fenced():
            self._publish_latest()

    def _publish_latest(self) -> None:
        """Publish the newest durable checkpoint as the next snapshot, at most one per
        ``snapshot_every_seconds`` (always while stopping)."""
        assert self.writer is not None
        if (
            self.published_seq is not None
            and not self.stop_event.is_set()
            and time.time() - self._last_publish < self.s.snapshot_every_seconds
        ):
            return  # the next checkpoint after the interval publishes (it holds this one's events)
        paths = self.store.paths()
        if not paths or paths[-1][0] == self.published_seq:
            return
        seq, path = paths[-1]
        t0 = time.perf_counter()
        data = path.read_bytes()
        if len(data) > self.writer.max_bytes:
            log.error(
                "snapshot of %d bytes exceeds the producer's max_request_size: not published "
                "(raise kafka.client_options.max_request_size and the model topic's max.message.bytes)",
                len(data),
            )
            return
        sid = SnapshotId(self.epoch, self.version)
        try:
            self.writer.publish(sid, data)
        except Exception as exc:
            log.warning("snapshot %s not published (the next checkpoint tries again): %s", sid, exc)
            return
        self.published_seq = seq
        self._last_publish = time.time()
        m = self.role_metrics
        if m is not None:
            m.published.inc()
            m.snapshot_bytes.set(len(data))
            m.publish_seconds.set(time.perf_counter() - t0)
            m.set_snapshot(sid.epoch, sid.version, published_at=self._last_publish)
        log.debug("published snapshot %d.%d (%d bytes)", sid.epoch, sid.version, len(data))


def _snapshot_id(ck: Checkpoint) -> SnapshotId:
    return SnapshotId(int(ck.extra.get("epoch", 0)), int(ck.extra.get("version", 0)))
