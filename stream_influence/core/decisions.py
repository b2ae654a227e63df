"""The one decision-record schema: what happened to one input message.

The service's decisions topic, ``replay``'s decisions file, the demo and the ``score`` audit all
write :class:`DecisionRecord` s, one JSON object per input message:

* ``id`` (``null`` for a dead letter, unless a best-effort id could be read), ``decision``
  (``accept`` | ``quarantine`` | ``dead_letter``) and ``reason`` (a routing reason of
  :data:`~stream_influence.core.policy.REASONS`, or the dead letter's reason);
* ``detail`` — dead letters only: what was wrong;
* the four scores ``influence``, ``relative_influence``, ``cosine_influence``, ``self_influence``
  (``null`` where none exists: dead letters, events before the reference set exists).  Their sign
  convention is the project's: positive = learning the event would raise the trusted reference
  loss (memorise, route away); ``self_influence`` is always ≤ 0;
* ``corrected_loss`` — the ``score`` audit only: the event's held-out label loss corrected toward
  the trusted set (nats; higher = the label is more likely wrong), the audit's flipped-label
  ranking (:func:`stream_influence.offline.audit.corrected_loss`);
* where the message came from, when it has such a place: ``source_topic``, ``source_partition``,
  ``source_offset`` (Kafka) or ``line`` (a file, 1-based).

>>> DecisionRecord("e1", "accept", "helpful", -0.5, -0.2, -0.1, -2.0).to_json()
'{"id":"e1","decision":"accept","reason":"helpful","influence":-0.5,"relative_influence":-0.2,"cosine_influence":-0.1,"self_influence":-2.0}'
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Decision", "DecisionRecord"]

Decision = Literal["accept", "quarantine", "dead_letter"]
_SCORES = ("influence", "relative_influence", "cosine_influence", "self_influence")
_SOURCE = ("source_topic", "source_partition", "source_offset")


def _num(x: float | None) -> float | None:
    return None if x is None or x != x else x  # NaN → null


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One input message's outcome (see the module docstring for the fields)."""

    id: str | None
    decision: Decision
    reason: str
    influence: float | None = None
    relative_influence: float | None = None
    cosine_influence: float | None = None
    self_influence: float | None = None
    detail: str | None = None
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    line: int | None = None
    corrected_loss: float | None = None

    def __post_init__(self) -> None:
        for name in (*_SCORES, "corrected_loss"):  # NaN is not JSON: a missing score is null
            object.__setattr__(self, name, _num(getattr(self, name)))

    @classmethod
    def dead_letter(cls, reason: str, detail: str, *, id: str | None = None) -> DecisionRecord:
        return cls(id, "dead_letter", reason, detail=detail)

    def with_source(self, topic: str, partition: int, offset: int) -> DecisionRecord:
        return dataclasses.replace(self, source_topic=topic, source_partition=partition, source_offset=offset)

    def replace(self, **changes: Any) -> DecisionRecord:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: scores always present (``null`` when missing), ``detail`` for dead
        letters, ``corrected_loss``, the source fields and ``line`` when known."""
        out: dict[str, Any] = {"id": self.id, "decision": self.decision, "reason": self.reason}
        if self.decision == "dead_letter" or self.detail is not None:
            out["detail"] = self.detail
        for name in _SCORES:
            out[name] = getattr(self, name)
        if self.corrected_loss is not None:
            out["corrected_loss"] = self.corrected_loss
        if self.source_topic is not None:
            for name in _SOURCE:
                out[name] = getattr(self, name)
        if self.line is not None:
            out["line"] = self.line
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecisionRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
