"""The emitter on an in-memory producer: every message of a chunk ends in exactly one place, a
record refused for itself dead-letters its message, broker trouble rolls the window back.

The producer here implements :class:`~stream_influence.io.broker.BrokerProducer` in memory (a unit
test); the same paths run against the real broker in tests/test_service_poison.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from stream_influence.config import AppSettings
from stream_influence.core.engine import BatchResult, InfluenceEngine
from stream_influence.io.broker import (
    BrokerTrouble,
    Delivery,
    OutputRecord,
    Queued,
    Record,
    RecordRefused,
    TopicPartition,
    produce_each,
)
from stream_influence.io.records import OUTPUT_FAILED, header_dict
from stream_influence.service.emitter import Emitter, OutputsNotAcknowledged
from tests.fixtures.service_events import events, malformed

TP = TopicPartition("events", 2)
Verdict = Callable[[OutputRecord], BaseException | None]


class MemoryProducer:
    """Keeps what it was given; ``refuse`` raises at produce, ``fail`` fails a delivery at flush."""

    max_request_size = 1_048_576

    def __init__(self, refuse: Verdict = lambda r: None, fail: Verdict = lambda r: None) -> None:
        self.refuse, self.fail = refuse, fail
        self.sent: list[OutputRecord] = []
        self._pending: list[Delivery] = []

    def produce(self, record: OutputRecord) -> Delivery:
        exc = self.refuse(record)
        if exc is not None:
            raise exc
        d = Delivery(record)
        self._pending.append(d)
        return d

    def produce_many(self, records: Sequence[OutputRecord]) -> Queued:
        return produce_each(self.produce, records)

    def flush(self, timeout_s: float) -> None:
        for d in self._pending:
            exc = self.fail(d.record)
            d.resolve(exc, transient=isinstance(exc, TimeoutError))
            if exc is None:
                self.sent.append(d.record)
        self._pending = []

    def close(self, timeout_s: float) -> None:
        pass


def _chunk() -> tuple[AppSettings, list[Record], BatchResult]:
    cfg = AppSettings.model_validate(
        {
            "engine": {"policy": {"warmup_events": 50}, "reference": {"min_size": 60}},
            "kafka": {"accepted_topic": "events.accepted", "decisions_topic": "events.decisions"},
        }
    )
    engine = InfluenceEngine(cfg.engine)
    engine.add_reference(events(200, seed=5, prefix="ref")[0])
    engine.process(events(300, noise=0.3, seed=6, prefix="warm")[0])
    values = events(400, noise=0.4, seed=7)[0] + malformed(12, seed=8)
    msgs = [
        Record(TP.topic, TP.partition, 1000 + i, b"k", v, [("trace", b"t")], None)
        for i, v in enumerate(values)
    ]
    result = engine.process(values)
    assert result.quarantine.any() and result.rejects, "the chunk must exercise every destination"
    return cfg, msgs, result


def _emit(producer: MemoryProducer) -> tuple[Emitter, list[Record], BatchResult]:
    cfg, msgs, result = _chunk()
    emitter = Emitter(cfg.kafka, lambda kind, n: None)
    emitter.producer = producer
    emitter.emit(TP, msgs, result)
    return emitter, msgs, result


def _destinations(sent: list[OutputRecord], topics: set[str]) -> dict[int, list[str]]:
    where: dict[int, list[str]] = {}
    for rec in sent:
        if rec.topic in topics:
            where.setdefault(int(header_dict(rec.headers)["source_offset"]), []).append(rec.topic)
    return where


def test_every_message_ends_in_exactly_one_place() -> None:
    producer = MemoryProducer()
    emitter, msgs, result = _emit(producer)
    emitter.settle(5.0)
    k = emitter.k
    where = _destinations(producer.sent, {k.dead_letter_topic, k.quarantine_topic, "events.accepted"})
    assert sorted(where) == [m.offset for m in msgs]
    assert all(len(v) == 1 for v in where.values())
    counts = {t: sum(v == [t] for v in where.values()) for t in (k.dead_letter_topic, k.quarantine_topic)}
    assert counts == {
        k.dead_letter_topic: len(result.rejects),
        k.quarantine_topic: int(result.quarantine.sum()),
    }
    # A dead letter keeps the original key, value and the input's own headers.
    dead = [r for r in producer.sent if r.topic == k.dead_letter_topic]
    assert all(r.key == b"k" and ("trace", b"t") in list(r.headers) for r in dead)
    assert {r.value for r in dead} == {m.value for m in msgs[-12:]}
    assert len([r for r in producer.sent if r.topic == "events.decisions"]) == len(msgs)
    assert emitter.inflight == [] and dict(emitter.outputs)["decisions"] == len(msgs)


def test_a_quarantine_copy_refused_at_produce_dead_letters_its_message() -> None:
    cfg, _, _ = _chunk()
    qtopic = cfg.kafka.quarantine_topic
    victim: list[bytes] = []

    def refuse(rec: OutputRecord) -> BaseException | None:
        if rec.topic == qtopic and (not victim or rec.key == victim[0]):
            victim.append(rec.key or b"")
            return RecordRefused("ValueError: a header cannot be encoded")
        return None

    producer = MemoryProducer(refuse=refuse)
    emitter, _, _ = _emit(producer)
    emitter.settle(5.0)
    dead = [r for r in producer.sent if r.topic == cfg.kafka.dead_letter_topic]
    h = [header_dict(r.headers) for r in dead if header_dict(r.headers)["reason"] == OUTPUT_FAILED]
    assert len(h) == 1 and "quarantine copy" in h[0]["detail"] and "cannot be encoded" in h[0]["detail"]
    offset = int(h[0]["source_offset"])
    assert all(
        int(header_dict(r.headers)["source_offset"]) != offset for r in producer.sent if r.topic == qtopic
    )
    audit = [r for r in producer.sent if r.topic == "events.decisions"]
    rec = next(
        json.loads(r.value or b"") for r in audit if json.loads(r.value or b"")["source_offset"] == offset
    )
    assert (rec["decision"], rec["reason"]) == ("dead_letter", OUTPUT_FAILED)


def test_a_record_the_broker_refuses_after_produce_is_dead_lettered_at_settle() -> None:
    refused: list[int] = []

    def fail(rec: OutputRecord) -> BaseException | None:
        if rec.topic.endswith("quarantine") and not refused:
            refused.append(int(header_dict(rec.headers)["source_offset"]))
            return ValueError("MessageSizeTooLargeError")  # not retriable: this record only
        return None

    producer = MemoryProducer(fail=fail)
    emitter, _, _ = _emit(producer)
    emitter.settle(5.0)  # no rollback: the message found another place
    minimal = [r for r in producer.sent if r.topic == emitter.k.dead_letter_topic and r.value == b""]
    assert len(minimal) == 1
    h = header_dict(minimal[0].headers)
    assert int(h["source_offset"]) == refused[0] and h["reason"] == OUTPUT_FAILED
    assert "original_sha256" in h and emitter.inflight == []


@pytest.mark.parametrize("how", ["at produce", "at flush"])
def test_broker_trouble_is_never_blamed_on_one_record(how: str) -> None:
    trouble: dict[str, Any] = {
        "at produce": {"refuse": lambda r: BrokerTrouble("buffer full")},
        "at flush": {"fail": lambda r: TimeoutError("request timed out")},
    }[how]
    producer = MemoryProducer(**trouble)
    emitter, _, _ = _emit(producer)
    with pytest.raises(OutputsNotAcknowledged):
        emitter.settle(5.0)
    # Nothing was dead-lettered in place of the window: it is rolled back and replayed whole.
    assert not [r for r in producer.sent if header_dict(r.headers).get("reason") == OUTPUT_FAILED]
    emitter.discard()
    assert emitter.producer is None and emitter.send_error is None and emitter.inflight == []


def test_a_chunk_reaches_the_producer_a_kind_at_a_time_and_refusals_keep_their_place() -> None:
    """The emitter hands the producer each kind of output of a chunk in one ``produce_many``
    call (dead letters, quarantine copies, accepted copies, decisions); a copy refused for itself
    splits its call, and its dead letter is queued right after it — the order one ``produce``
    per record gave."""
    cfg, msgs, result = _chunk()
    qtopic, dlq = cfg.kafka.quarantine_topic, cfg.kafka.dead_letter_topic
    copies = [msgs[int(result.events.index[j])].offset for j in np.flatnonzero(result.quarantine)]
    victims = {copies[2], copies[5]}

    def refuse(rec: OutputRecord) -> BaseException | None:
        if rec.topic == qtopic and int(header_dict(rec.headers)["source_offset"]) in victims:
            return RecordRefused("ValueError: a header cannot be encoded")
        return None

    class Counting(MemoryProducer):
        def __init__(self) -> None:
            super().__init__(refuse=refuse)
            self.calls, self.queued = 0, []

        def produce_many(self, records: Sequence[OutputRecord]) -> Queued:
            self.calls += 1
            q = super().produce_many(records)
            self.queued += [
                (r.topic, int(header_dict(r.headers).get("source_offset", -1)))
                for r in records[: len(q.deliveries)]
            ]
            return q

    producer = Counting()
    emitter = Emitter(cfg.kafka, lambda kind, n: None)
    emitter.producer = producer
    emitter.emit(TP, msgs, result)
    assert emitter.send_error is None
    assert producer.calls == 4 + 2 * len(victims)  # each victim: the split, and its dead letter
    rejected = [(dlq, msgs[rej.index].offset) for rej in result.rejects]
    expected = rejected + [(dlq, o) if o in victims else (qtopic, o) for o in copies]
    assert [q for q in producer.queued if q[0] in (qtopic, dlq)] == expected


@pytest.mark.parametrize("producer_takes_null_headers", [False, True])
def test_an_input_header_without_a_value_never_stops_the_chunk(producer_takes_null_headers: bool) -> None:
    """A Kafka header may have no value (kafka-python reads it as ``None``).  The chunk's outputs
    are still produced — the chunk-wide size proof once raised ``TypeError`` out of ``emit`` on
    one (``len(None)``), stopping the service — and every message that needs an output of its own
    (dead letter, quarantine copy) ends in exactly one place, whether the producer takes a null
    header (librdkafka) or refuses the record for it (kafka-python's ``send``)."""
    cfg, msgs, result = _chunk()
    msgs = [m._replace(headers=[("trace", None), ("span", b"s")]) for m in msgs]

    def refuse(rec: OutputRecord) -> BaseException | None:
        if not producer_takes_null_headers and any(v is None for _, v in rec.headers):
            return RecordRefused("TypeError: All headers items must be (str, bytes) tuples")
        return None

    producer = MemoryProducer(refuse=refuse)
    emitter = Emitter(cfg.kafka, lambda kind, n: None)
    emitter.producer = producer
    emitter.emit(TP, msgs, result)
    emitter.settle(5.0)
    k = cfg.kafka
    where = _destinations(producer.sent, {k.dead_letter_topic, k.quarantine_topic})
    own = [msgs[rej.index].offset for rej in result.rejects] + [
        msgs[int(result.events.index[j])].offset for j in np.flatnonzero(result.quarantine)
    ]
    assert sorted(where) == sorted(own)
    assert all(len(v) == 1 for v in where.values())
    assert len([r for r in producer.sent if r.topic == "events.decisions"]) == len(msgs)
    assert emitter.inflight == []
