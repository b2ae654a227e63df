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
from typing import TYPE_CHECKING, Any

from stream_influence.errors import OutputError
from stream_influence.io.broker import Broker, Headers, OutputRecord, TopicPartition
from stream_influence.io.records import header_dict

if TYPE_CHECKING:
    from stream_influence.config import ScaleOutSettings

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
    quarantine_headers: Headers,
    source_topic: str,
    source_partition: int,
    quarantine: bool,
    snapshot: SnapshotId,
) -> OutputRecord:
    """The updates record of one valid event (``quarantine_headers`` from
    :meth:`~stream_influence.io.records.ChunkHeaders.quarantine`, with ``model_version`` = the snapshot version)."""
    headers = [
        *quarantine_headers,
        ("decision", b"quarantine" if quarantine else b"accept"),
        ("snapshot_epoch", str(snapshot.epoch).encode()),
    ]
    key = f"{source_topic}-{source_partition}".encode()
    return OutputRecord(updates_topic, key=key, value=value, headers=headers)


def parse_update(headers: Any) -> UpdateRecord | None:
    """The decision and source of an updates record; None if its headers are not ours."""
    h = header_dict(headers)
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


def ensure_scaleout_topics(broker: Broker, s: ScaleOutSettings) -> None:
    """Create the updates topic and the one-partition model topic if missing (best effort).  The
    backend creates topics with the broker's defaults: create the model topic yourself with
    ``cleanup.policy=compact`` (deploy/ does), or it keeps every snapshot until retention."""
    broker.ensure_topics([s.updates_topic], partitions=s.updates_partitions)
    broker.ensure_topics([s.model_topic], partitions=1)


class ModelTopicReader:
    """Reads the model topic from the beginning, outside any group: the highest lease epoch and
    the newest snapshot not fenced by a lease read before it."""

    def __init__(self, broker: Broker, s: ScaleOutSettings) -> None:
        self.consumer = broker.consumer(group=False)
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
        for msgs in self.consumer.poll(timeout_ms, 100).values():
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
        h = header_dict(m.headers)
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
            self.poll(200)
            hw, pos = self.consumer.highwater(self.tp), self.consumer.position(self.tp)
            if hw is not None and pos is not None and pos >= hw:
                return True
        return False

    def close(self) -> None:
        self.consumer.close(5000)


class ModelTopicWriter:
    """Publishes leases and snapshots, each flushed before the call returns (a snapshot is out
    before the updater's offsets move on)."""

    def __init__(self, broker: Broker, s: ScaleOutSettings, owner: str, timeout_s: float) -> None:
        self.producer = broker.producer()
        self.topic = s.model_topic
        self.owner = owner
        self.timeout_s = timeout_s

    @property
    def max_bytes(self) -> int:
        """The largest snapshot the producer sends (``kafka.client_options.max_request_size``)."""
        return self.producer.max_request_size - 1024  # key, headers, framing

    def _send(self, record: OutputRecord) -> None:
        delivery = self.producer.produce(record)
        self.producer.flush(self.timeout_s)
        if delivery.error is not None:
            raise OutputError(f"{record.topic}: {delivery.error!r}")

    def lease(self, epoch: int) -> Lease:
        lease = Lease(epoch, self.owner, time.time())
        value = json.dumps({"epoch": lease.epoch, "owner": lease.owner, "at": lease.at}).encode()
        self._send(OutputRecord(self.topic, LEASE_KEY, value, []))
        return lease

    def publish(self, sid: SnapshotId, data: bytes) -> None:
        headers = [
            ("epoch", str(sid.epoch).encode()),
            ("version", str(sid.version).encode()),
            ("published_at", repr(time.time()).encode()),
            ("owner", self.owner.encode()),
        ]
        self._send(OutputRecord(self.topic, SNAPSHOT_KEY, data, headers))

    def close(self) -> None:
        self.producer.close(5)
