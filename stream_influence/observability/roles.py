"""Metrics of the scale-out roles (``run --role score|update``), on the service's registry.

The topology is read from them: ``role`` of every process, the snapshot version each worker
scores with, how far behind the newest one it is and how old it is; the updater's published
version, duplicates skipped and fencing.  The updater's lag is the service's
``stream_influence_consumer_lag_messages`` on the updates topic.  Documented in docs/metrics.md.

>>> m = RoleMetrics("score")
>>> m.set_snapshot(3, 7, published_at=0.0, newest=(3, 9))
>>> m.registry.get_sample_value("stream_influence_snapshot_version_lag")
2.0
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge

from stream_influence.observability.metrics import PREFIX

__all__ = ["RoleMetrics"]


class RoleMetrics:
    """Gauges and counters of one score worker or updater."""

    def __init__(self, role: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = reg = registry if registry is not None else CollectorRegistry()
        p = PREFIX
        Gauge(
            p + "role_info", "Always 1; the role of this process (score, update).", ["role"], registry=reg
        ).labels(role).set(1)
        self.epoch = Gauge(
            p + "snapshot_epoch",
            "Lease epoch of the model snapshot in use (score) or last published (update).",
            registry=reg,
        )
        self.version = Gauge(
            p + "snapshot_version",
            "Version of the model snapshot in use (score) or last published (update), within its epoch.",
            registry=reg,
        )
        self.version_lag = Gauge(
            p + "snapshot_version_lag",
            "Score worker: versions between the newest snapshot read from the model topic and the one "
            "in use (0 once swapped in).",
            registry=reg,
        )
        self._published_at = float("nan")
        Gauge(
            p + "snapshot_age_seconds",
            "Seconds since the snapshot in use (score) or last published (update) was published.",
            registry=reg,
        ).set_function(lambda: time.time() - self._published_at)
        self.events_on_snapshot = Gauge(
            p + "snapshot_events_scored",
            "Score worker: events scored with the snapshot in use (bounded by "
            "scaleout.max_model_lag_versions × checkpoint.every_events).",
            registry=reg,
        )
        self.events_unlearned = Gauge(
            p + "snapshot_events_unlearned",
            "Score worker: offsets it scored and sent to the updates topic that the snapshot in use "
            "has not learned (bounded like snapshot_events_scored).",
            registry=reg,
        )
        self.stale = Gauge(
            p + "snapshot_stale",
            "Score worker: 1 while it holds chunks back, waiting for a newer (or a first) snapshot.",
            registry=reg,
        )
        self.swaps = Counter(p + "snapshot_swaps", "Score worker: snapshots swapped in.", registry=reg)
        self.published = Counter(p + "snapshots_published", "Updater: snapshots published.", registry=reg)
        self.snapshot_bytes = Gauge(
            p + "snapshot_bytes", "Size of the last snapshot published or swapped in.", registry=reg
        )
        self.publish_seconds = Gauge(
            p + "snapshot_publish_seconds",
            "Updater: time to publish the last snapshot (read, send, acknowledged).",
            registry=reg,
        )
        self.applied = Counter(
            p + "updates_applied",
            "Updater: updates records learned (each valid input event once), by decision.",
            ["decision"],
            registry=reg,
        )
        for d in ("accept", "quarantine"):
            self.applied.labels(d)
        self.duplicates = Counter(
            p + "updates_duplicates",
            "Updater: updates records skipped because their source offset was already learned "
            "(a score worker replayed a window).",
            registry=reg,
        )
        self.rejected = Counter(
            p + "updates_rejected",
            "Updater: updates records it could not read or decode (not learned; logged).",
            registry=reg,
        )
        self.fenced = Gauge(
            p + "updater_fenced", "Updater: 1 once a newer updater's lease fenced this one.", registry=reg
        )

    def set_snapshot(
        self, epoch: int, version: int, *, published_at: float, newest: tuple[int, int] | None = None
    ) -> None:
        self.epoch.set(epoch)
        self.version.set(version)
        self._published_at = published_at
        if newest is not None:
            # Versions keep counting across epochs (a new updater continues from its snapshot).
            self.version_lag.set(max(0, newest[1] - version))
