"""Health: the snapshot ``/readyz`` reads.

The loop publishes a new immutable :class:`HealthSnapshot` whenever what it reports changes; the
HTTP thread only reads the latest one (one attribute read: no lock, no call into the service).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from stream_influence.io.broker import TopicPartition

__all__ = ["Health", "HealthSnapshot"]


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """What ``/readyz`` reports: ready when partitions are assigned, the broker is reachable and
    the model is warm."""

    assigned_partitions: tuple[str, ...] = ()
    broker_reachable: bool = True
    model_warm: bool = False
    not_warm_reason: str = ""

    @property
    def ready(self) -> bool:
        return bool(self.assigned_partitions) and self.broker_reachable and self.model_warm

    def detail(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "assigned_partitions": list(self.assigned_partitions),
            "broker_reachable": self.broker_reachable,
            "model_warm": self.model_warm,
        }
        if not self.model_warm:
            d["not_warm_reason"] = self.not_warm_reason
        return d


@dataclass
class Health:
    """Holds the latest snapshot; :meth:`ready` is what the metrics server calls."""

    snapshot: HealthSnapshot = field(default_factory=HealthSnapshot)

    def publish(
        self, owned: Iterable[TopicPartition], broker_reachable: bool, warm: bool, not_warm_reason: str
    ) -> None:
        self.snapshot = HealthSnapshot(
            tuple(sorted(f"{tp.topic}-{tp.partition}" for tp in owned)),
            broker_reachable,
            warm,
            "" if warm else not_warm_reason,
        )

    def ready(self) -> tuple[bool, dict[str, Any]]:
        snap = self.snapshot  # one read: the loop replaces it, never changes it
        return snap.ready, snap.detail()
