"""The two internal topics of the scale-out roles (``run --role score|update``).

**Updates topic** (``scaleout.updates_topic``): one record per valid input event, written by the
score worker that decided it — the original value, keyed by the event's *source partition*
(``topic-partition``, so every record of one input partition lands in one updates partition, in
offset order), with the quarantine headers (source coordinates, reason, scores, threshold,
policy version, ``model_version`` = the snapshot version it was scored with) plus ``decision``
(``accept`` / ``quarantine``) and ``snapshot_epoch``.  :func:`update_record` writes it,
:func:`parse_update` reads it back.

**Model topic** (``scaleout.model_topic``, one partition, ``cleanup.policy=compact``): two keys.

- ``lease`` — ``{"epoch": e, "owner": …, "at": …}``, written by an updater when it starts, with
  ``e`` one above every epoch in the topic.  The newest updater wins: an updater that sees a
  lease with a higher epoch than its own is *fenced* and stops before it publishes again, and
  readers ignore snapshots of an epoch below a lease they have already read.
- ``snapshot`` — the bytes of the updater's checkpoint file (engine state, input offsets of the
  updates topic, the per-source-partition high-water marks it has applied), headers ``epoch``,
  ``version``, ``published_at``, ``owner``.  Snapshots are ordered by ``(epoch, version)``.

Compaction keeps the latest lease and the latest snapshot; a reader reads the partition from the
beginning and keeps the newest valid snapshot it saw.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from stream_influence.config import KafkaSettings, ScaleOutSettings
from stream_influence.io import kafka_io

__all__ = [
    "Lease",
    "ModelTopicReader",
    "ModelTopicWriter",
    "Snapshot",
    "SnapshotId",
    "UpdateRecord",
    "ensure_scaleout_topics",
    "parse_update",
    "update_record",
]

log = logging.getLogger(__name__)

LEASE_KEY = b"lease"
SNAPSHOT_KEY = b"snapshot"


# -- updates topic ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UpdateRecord:
    """What the updater needs of one updates record (the value is the original event)."""

    topic: str
    partition: int
    offset: int
    quarantine: bool
    snapshot: SnapshotId


def update_record(
    updates_topic: str,
    value: bytes | None,
    quarantine_headers: kafka_io.Headers,
    source_topic: str,
    source_partition: int,
    quarantine: bool,
    snapshot: SnapshotId,
) -> kafka_io.OutputRecord:
    """The updates record of one valid event (``quarantine_headers`` from
    :func:`kafka_io.quarantine_headers`, with ``model_version`` = the snapshot version)."""
    headers = [
        *quarantine_headers,
        ("decision", b"quarantine" if quarantine else b"accept"),
        ("snapshot_epoch", str(snapshot.epoch).encode()),
    ]
    key = f"{source_topic}-{source_partition}".encode()
    return kafka_io.OutputRecord(updates_topic, key=key, value=value, headers=headers)


def parse_update(headers: Any) -> UpdateRecord | None:
    """The decision and source of an updates record; None if its headers are not ours."""
    h = kafka_io.header_dict(headers)
    try:
        return UpdateRecord(
            h["source_topic"],
            int(h["source_partition"]),
            int(h["source_offset"]),
            {"quarantine": True, "accept": False}[h["decision"]],
            SnapshotId(int(h["snapshot_epoch"]), int(h["model_version"])),
        )
    except (KeyError, ValueError):
        return None


# -- model topic -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, order=True)
class SnapshotId:
    """Order of snapshots: the updater's lease epoch, then its publication counter."""

    epoch: int
    version: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    id: SnapshotId
    data: bytes
    published_at: float
    owner: str


@dataclass(frozen=True, slots=True)
class Lease:
    epoch: int
    owner: str
    at: float


def ensure_scaleout_topics(k: KafkaSettings, s: ScaleOutSettings) -> None:
    """Create the updates topic and the compacted, one-partition model topic if missing."""
    admin = kafka_io.build_admin(k)
    try:
        existing = set(admin.list_topics())
        new = []
        if s.updates_topic not in existing:
            new.append(NewTopic(s.updates_topic, num_partitions=s.updates_partitions, replication_factor=-1))
        if s.model_topic not in existing:
            configs = {"cleanup.policy": "compact", "max.message.bytes": str(s.snapshot_max_bytes + 4096)}
            new.append(NewTopic(s.model_topic, 1, replication_factor=-1, topic_configs=configs))
        for topic in new:
            try:
                admin.create_topics([topic])
                log.info("created topic %s", topic.name)
            except TopicAlreadyExistsError:
                pass  # another worker or the updater created it meanwhile
    finally:
        admin.close()


class ModelTopicReader:
    """Reads the model topic from the beginning, outside any group: the highest lease epoch and
    the newest snapshot not fenced by a lease read before it."""

    def __init__(self, k: KafkaSettings, s: ScaleOutSettings) -> None:
        opts = kafka_io.consumer_options(k, group=False)
        opts.update(
            max_partition_fetch_bytes=s.snapshot_max_bytes + 65536, fetch_max_bytes=s.snapshot_max_bytes * 2
        )
        self.consumer = KafkaConsumer(**opts)
        self.tp = TopicPartition(s.model_topic, 0)
        self.consumer.assign([self.tp])
        self.consumer.seek_to_beginning(self.tp)
        self.lease_epoch = 0  # the highest lease epoch read
        self.lease: Lease | None = None
        self.latest: Snapshot | None = None  # the newest valid snapshot read
        self.ignored = 0  # snapshots fenced by an earlier lease, or not newer than `latest`

    def poll(self, timeout_ms: int = 0) -> bool:
        """Read what is new; True if a newer snapshot arrived."""
        newer = False
        for msgs in self.consumer.poll(timeout_ms=timeout_ms, max_records=100).values():
            for m in msgs:
                newer |= self._read(m)
        return newer

    def _read(self, m: Any) -> bool:
        if m.key == LEASE_KEY:
            try:
                lease = Lease(**json.loads(m.value))
            except (TypeError, ValueError) as exc:
                log.warning("model topic @%d: unreadable lease ignored: %s", m.offset, exc)
                return False
            if lease.epoch > self.lease_epoch:
                self.lease_epoch, self.lease = lease.epoch, lease
            return False
        if m.key != SNAPSHOT_KEY or m.value is None:
            return False
        h = kafka_io.header_dict(m.headers)
        try:
            sid = SnapshotId(int(h["epoch"]), int(h["version"]))
            published_at = float(h["published_at"])
        except (KeyError, ValueError):
            log.warning("model topic @%d: snapshot without a valid id ignored", m.offset)
            return False
        if sid.epoch < self.lease_epoch or (self.latest is not None and sid <= self.latest.id):
            self.ignored += 1  # a fenced updater's, or a stale one
            return False
        self.latest = Snapshot(sid, m.value, published_at, h.get("owner", ""))
        return True

    def read_to_end(self, timeout_s: float) -> bool:
        """Read up to the current end of the topic; False if that took longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll(timeout_ms=200)
            hw = self.consumer.highwater(self.tp)
            if hw is not None and self.consumer.position(self.tp) >= hw:
                return True
        return False

    def close(self) -> None:
        self.consumer.close()


class ModelTopicWriter:
    """Publishes leases and snapshots (each flushed: a snapshot is out before offsets move on)."""

    def __init__(self, k: KafkaSettings, s: ScaleOutSettings, owner: str) -> None:
        opts = kafka_io.producer_options(k)
        opts.update(max_request_size=s.snapshot_max_bytes + 4096, acks="all", linger_ms=0)
        self.producer = KafkaProducer(**opts)
        self.topic = s.model_topic
        self.owner = owner
        self.timeout_s = k.flush_timeout_seconds

    def lease(self, epoch: int) -> Lease:
        lease = Lease(epoch, self.owner, time.time())
        value = json.dumps({"epoch": lease.epoch, "owner": lease.owner, "at": lease.at}).encode()
        self.producer.send(self.topic, key=LEASE_KEY, value=value).get(timeout=self.timeout_s)
        return lease

    def publish(self, sid: SnapshotId, data: bytes) -> None:
        headers = [
            ("epoch", str(sid.epoch).encode()),
            ("version", str(sid.version).encode()),
            ("published_at", repr(time.time()).encode()),
            ("owner", self.owner.encode()),
        ]
        self.producer.send(self.topic, key=SNAPSHOT_KEY, value=data, headers=headers).get(
            timeout=self.timeout_s
        )

    def close(self) -> None:
        self.producer.close(timeout=5)
