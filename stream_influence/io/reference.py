"""Reading a topic outside the consumer group: the reference topic, and any topic to its end."""

from __future__ import annotations

import logging
import time

from stream_influence.io.broker import Broker, ConsumedRecord, TopicPartition
from stream_influence.io.lag import LagCheck

__all__ = ["ReferenceReader"]

log = logging.getLogger(__name__)


class ReferenceReader:
    """Reads every partition of ``topic`` outside the consumer group.

    Starts at the offsets a checkpoint recorded (so a restart does not add the same trusted
    events to the buffer twice) or at the beginning.
    """

    def __init__(
        self, broker: Broker, topic: str, offsets: dict[int, int] | None = None, max_records: int = 500
    ) -> None:
        self.topic = topic
        self.consumer = broker.consumer(group=False)
        self.offsets: dict[int, int] = dict(offsets or {})
        self._assigned: set[int] = set()
        self._lag = LagCheck()
        self._max_records = max_records

    def _tp(self, p: int) -> TopicPartition:
        return TopicPartition(self.topic, p)

    def _assign(self) -> bool:
        parts = self.consumer.partitions_for(self.topic)
        if not parts:
            return False
        if parts == self._assigned:
            return True
        tps = [self._tp(p) for p in sorted(parts)]
        self.consumer.assign(tps)
        for tp in tps:
            if tp.partition in self.offsets:
                self.consumer.seek(tp, self.offsets[tp.partition])
            else:
                self.consumer.seek_to_beginning(tp)
        self._assigned = set(parts)
        return True

    def rewind(self, offsets: dict[int, int]) -> None:
        """Continue from ``offsets`` (a restored checkpoint's); partitions it lacks restart at 0."""
        self.offsets = dict(offsets)
        for p in self._assigned:
            if p in self.offsets:
                self.consumer.seek(self._tp(p), self.offsets[p])
            else:
                self.consumer.seek_to_beginning(self._tp(p))

    def poll_records(self, timeout_ms: int = 0) -> list[ConsumedRecord]:
        """New messages, advancing :attr:`offsets`."""
        if not self._assign():  # the topic's metadata is not known yet
            time.sleep(min(timeout_ms, 200) / 1000)
            return []
        out: list[ConsumedRecord] = []
        for tp, msgs in self.consumer.poll(timeout_ms, self._max_records).items():
            out.extend(msgs)
            self.offsets[tp.partition] = msgs[-1].offset + 1
        return out

    def poll(self, timeout_ms: int = 0) -> list[bytes | None]:
        """New message values, advancing :attr:`offsets`."""
        return [m.value for m in self.poll_records(timeout_ms)]

    def check_recreated(self) -> list[int]:
        """Re-read from the beginning every partition whose position has been past its high
        watermark at two checks in a row: the topic was deleted and re-created (or truncated).
        Apache Kafka answers OFFSET_OUT_OF_RANGE there; not every broker does.  Returns them."""
        reset: list[int] = []
        for p in sorted(self._assigned):
            lag = self._lag.check(self.consumer, self._tp(p))
            if lag is not None and lag.past_end:
                log.warning(
                    "reference topic %s-%d: position %d is past the end (%d): topic re-created or "
                    "truncated; reading it again from the beginning",
                    self.topic,
                    p,
                    lag.position,
                    lag.highwater,
                )
                self.consumer.seek_to_beginning(self._tp(p))
                self.offsets[p] = 0
                reset.append(p)
        return reset

    def caught_up(self) -> bool:
        if not self._assigned:
            return False
        for p in self._assigned:
            hw = self.consumer.highwater(self._tp(p))
            if hw is None or self.offsets.get(p, 0) < hw:
                return False
        return True

    def read_to_end(self, timeout_s: float) -> tuple[list[ConsumedRecord], bool]:
        """Every message up to the current end of the topic, bounded by ``timeout_s``; the flag
        says whether the end was reached."""
        out: list[ConsumedRecord] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out.extend(self.poll_records(timeout_ms=200))
            if self.caught_up():
                return out, True
        return out, False

    def read_backlog(self, timeout_s: float) -> list[bytes | None]:
        """The values of everything up to the current end of the topic (bounded by ``timeout_s``)."""
        records, complete = self.read_to_end(timeout_s)
        if not complete:
            log.warning(
                "reference topic %s: backlog not fully read after %.0fs (%d events so far)",
                self.topic,
                timeout_s,
                len(records),
            )
        return [m.value for m in records]

    def close(self) -> None:
        self.consumer.close(5000)
