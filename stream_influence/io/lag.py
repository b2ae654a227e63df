"""The one lag computation: ``high watermark − position`` (``end_offsets`` is wrong on some
brokers), with the rule that notices a partition whose position stays past its end."""

from __future__ import annotations

from dataclasses import dataclass

from stream_influence.io.broker import BrokerConsumer, TopicPartition

__all__ = ["Lag", "LagCheck", "PastEnd", "watermarks"]


def watermarks(consumer: BrokerConsumer, tp: TopicPartition) -> tuple[int, int] | None:
    """``(position, high watermark)`` of ``tp`` without blocking, or None while either is unknown."""
    hw = consumer.highwater(tp)
    if hw is None:
        return None
    pos = consumer.position(tp)
    return None if pos is None else (pos, hw)


class PastEnd:
    """Notices a partition whose position stays past its high watermark: the topic was deleted
    and re-created (or truncated).  Apache Kafka answers OFFSET_OUT_OF_RANGE there; not every
    broker does.  Two checks in a row, so a watermark that lags one fetch is not mistaken."""

    def __init__(self) -> None:
        self._count: dict[object, int] = {}

    def check(self, key: object, pos: int, hw: int) -> bool:
        """True when ``key`` must be reset (its count then starts again)."""
        if pos <= hw:
            self._count.pop(key, None)
            return False
        n = self._count.get(key, 0) + 1
        if n >= 2:
            self._count.pop(key, None)
            return True
        self._count[key] = n
        return False


@dataclass(frozen=True, slots=True)
class Lag:
    """Where a partition's consumer stands against its high watermark."""

    tp: TopicPartition
    position: int
    highwater: int
    #: The position has been past the high watermark at two checks in a row: the topic was
    #: re-created or truncated, and the partition must be reset.
    past_end: bool

    @property
    def lag(self) -> int | None:
        """Records not yet fetched; None while the position is past the end."""
        return None if self.position > self.highwater else self.highwater - self.position


class LagCheck:
    """Lag of any consumer's partitions, with the past-the-end rule (input and reference topics)."""

    def __init__(self) -> None:
        self._past_end = PastEnd()

    def check(self, consumer: BrokerConsumer, tp: TopicPartition) -> Lag | None:
        wm = watermarks(consumer, tp)
        if wm is None:
            return None
        pos, hw = wm
        return Lag(tp, pos, hw, self._past_end.check(tp, pos, hw))
