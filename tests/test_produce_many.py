"""Producing a chunk's outputs at once (``BrokerProducer.produce_many``), and kafka-python's
batched append path (``io/kafka_python._Appender``) against kafka-python's own ``send``.

The appender writes records straight into kafka-python's accumulator; it must queue exactly what
``send`` queues.  Checked three ways: the batches both build from the same records are equal byte
for byte (in memory, timestamps fixed); the records both land on the real broker are equal
(partition, offset, key, value, headers, order); a record ``send`` refuses is refused with the
same reason, and stops the batch there.  Plus the two places kafka-python answers for a record
without ``send``'s per-record future: a batch split after MESSAGE_TOO_LARGE, and per-record errors.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kafka import KafkaProducer
from kafka import TopicPartition as KafkaTP
from kafka.errors import InvalidRecordError, NotLeaderForPartitionError
from kafka.producer.record_accumulator import RecordAccumulator
from kafka.record.default_records import DefaultRecordBatchBuilder

from stream_influence.config import KafkaSettings
from stream_influence.io import kafka_python as kp
from stream_influence.io.broker import Delivery, OutputRecord, open_broker
from stream_influence.io.records import RECORD_FRAMING, ChunkHeaders, _num, record_size
from tests.fixtures.broker import Broker, fresh_topic
from tests.fixtures.service_events import read_topic

TIMEOUT = 30.0  # generous: the machine may be loaded


def _records(topic: str, n: int = 120) -> list[OutputRecord]:
    """Every shape an output takes: quarantine-copy headers, input headers (non-ASCII names, empty
    values), no headers, a null key, a null value, values past the varint table (4096 B) and past
    the batch size."""
    h = ChunkHeaders("events", 3, 2, 17)
    out = []
    for i in range(n):
        headers = h.quarantine(
            [("trace", f"t-{i}".encode()), ("café-ß", b"")] if i % 3 == 0 else None,
            10_000 + i,
            reason="influence",
            influence=0.1 * i - 3,
            relative_influence=float("nan") if i % 7 == 0 else 1.0 / (i + 1),
            cosine_influence=-0.5,
            threshold=0.25,
        )
        value: bytes | None = b'{"id":"e-%d","features":[%s],"label":1}' % (i, b"0.123456," * (i % 50) + b"1")
        key: bytes | None = f"e-{i}".encode()
        if i % 17 == 5:
            headers = []
        if i % 19 == 6:
            key = None
        if i % 23 == 7:
            value = None
        if i % 29 == 8:
            value = bytes(range(256)) * (20 + i % 40)  # 5-15 kB: longer than the batch size below
        out.append(OutputRecord(topic, key, value, headers))
    return out


# -- in memory: the batches, byte for byte ----------------------------------------------------
@pytest.mark.parametrize(
    ("compression", "batch_size"), [(0, 4096), (1, 4096), (0, 997), (0, 1531), (0, 2203)]
)
def test_appended_batches_are_byte_identical_to_sends(compression: int, batch_size: int) -> None:
    """compression 1: gzip; a few batch sizes so that some records land just at the cut."""
    tp = KafkaTP("out", 0)
    recs = _records("out", 300)
    config = {"batch_size": batch_size, "compression_attrs": compression, "message_version": 2}
    plain, batched = RecordAccumulator(**config), RecordAccumulator(**config)
    appender = kp._Appender(batched, 1_048_576, wakeup=lambda: None)
    t0 = 1_790_000_000_000
    # Three calls, the later ones continuing the batch the earlier one left open, a later clock.
    for start, stop, ts in ((0, 50, t0), (50, 51, t0 + 3), (51, len(recs), t0 + 250)):
        for r in recs[start:stop]:
            plain.append(tp, ts, r.key, r.value, r.headers)
        appender.append(
            tp,
            [(appender.encode(r.key, r.value, r.headers), kp._RecordDelivery(r)) for r in recs[start:stop]],
            ts,
        )

    def built(acc: RecordAccumulator) -> list[bytes]:
        out = []
        for batch in acc._batches[tp]:
            batch.records.close()
            out.append(bytes(batch.records.buffer()))
        return out

    expected = built(plain)
    assert len(expected) > 10, "the records must span many batches"
    assert built(batched) == expected
    assert [b.record_count for b in batched._batches[tp]] == [b.record_count for b in plain._batches[tp]]


def test_the_batch_cut_falls_where_sends_does_to_the_byte() -> None:
    """A second record of every length around the one that fills the batch exactly."""
    tp = KafkaTP("out", 0)
    first = OutputRecord("out", b"k", b"v" * 700, [("a", b"1")])
    counts = set()
    for n in range(190, 260):
        second = OutputRecord("out", b"k2", b"w" * n, [("b", b"22")])
        plain, batched = (RecordAccumulator(batch_size=1024, message_version=2) for _ in range(2))
        appender = kp._Appender(batched, 1_048_576, wakeup=lambda: None)
        for r in (first, second):
            plain.append(tp, 5, r.key, r.value, r.headers)
        appender.append(
            tp,
            [(appender.encode(r.key, r.value, r.headers), kp._RecordDelivery(r)) for r in (first, second)],
            5,
        )
        sizes = [[b.record_count for b in acc._batches[tp]] for acc in (plain, batched)]
        assert sizes[0] == sizes[1], n
        counts.add(len(sizes[0]))
    assert counts == {1, 2}, "the lengths must straddle the cut"


def test_send_counts_record_size_as_the_appender_does() -> None:
    """The appender's size check uses send's estimate (the batch header plus the most framing a
    record takes, plus the encoded key, value and headers), which is records.record_size's."""
    assert (
        DefaultRecordBatchBuilder.HEADER_STRUCT.size + DefaultRecordBatchBuilder.MAX_RECORD_OVERHEAD
        == RECORD_FRAMING
    )
    appender = kp._Appender(RecordAccumulator(message_version=2), 1_048_576, wakeup=lambda: None)
    for r in _records("out", 60):
        size = RECORD_FRAMING + len(appender.encode(r.key, r.value, r.headers))
        assert size == DefaultRecordBatchBuilder.estimate_size_in_bytes(r.key, r.value, r.headers)
        assert size == record_size(r.key, r.value, r.headers)  # what fit_record cuts to


def _appended(n: int = 6) -> tuple[RecordAccumulator, Any, list[kp._RecordDelivery]]:
    tp = KafkaTP("out", 0)
    acc = RecordAccumulator(batch_size=1 << 20, message_version=2)
    appender = kp._Appender(acc, 1_048_576, wakeup=lambda: None)
    recs = _records("out", n)
    deliveries = [kp._RecordDelivery(r) for r in recs]
    appender.append(
        tp,
        [(appender.encode(r.key, r.value, r.headers), d) for r, d in zip(recs, deliveries, strict=True)],
        1,
    )
    (batch,) = acc._batches[tp]
    return acc, batch, deliveries


def test_the_broker_answer_for_a_batch_resolves_each_record() -> None:
    _, batch, deliveries = _appended()
    assert not any(d.done for d in deliveries)
    errors = {1: InvalidRecordError("bad record"), 4: NotLeaderForPartitionError("moved")}
    batch.complete_exceptionally(
        InvalidRecordError("batch"), lambda i: errors.get(i, InvalidRecordError("batch"))
    )
    assert all(d.done and d.failed() for d in deliveries)
    assert deliveries[1].error is errors[1] and not deliveries[1].transient
    assert deliveries[4].error is errors[4] and deliveries[4].transient  # retriable: broker trouble
    _, batch, deliveries = _appended()
    batch.complete(base_offset=100, log_append_time=-1)
    assert all(d.done and d.error is None for d in deliveries)


def test_a_batch_split_after_message_too_large_still_answers_every_record() -> None:
    """kafka-python splits a batch the broker found too large and rebinds each record's future to
    the new batches; the appender's deliveries stand in for those futures."""
    acc, batch, deliveries = _appended(7)
    acc._batches[batch.topic_partition].popleft()  # drained, sent, refused as too large
    batch.records.close()
    assert acc.split_and_reenqueue(batch) == 2
    acc.deallocate(batch)
    first, second = acc._batches[batch.topic_partition]
    assert (first.record_count, second.record_count) == (4, 3)
    first.complete(base_offset=0, log_append_time=-1)
    assert [d.done for d in deliveries] == [True] * 4 + [False] * 3
    second.complete_exceptionally(InvalidRecordError("x"), lambda i: InvalidRecordError(f"record {i}"))
    assert [str(d.error) for d in deliveries[4:]] == [
        str(InvalidRecordError(f"record {i}")) for i in range(3)
    ]
    assert all(d.error is None for d in deliveries[:4])


# -- on the real broker ---------------------------------------------------------------------
def _producer(bootstrap: str, **options: Any) -> kp.KafkaPythonProducer:
    k = KafkaSettings(
        bootstrap_servers=bootstrap,
        producer_batch_bytes=4096,  # many batches: the cut must fall where send's does
        client_options=options,
    )
    return kp.KafkaPythonProducer(kp.build_producer(k))


def _land(broker: Broker, recs_for: Any, producer: kp.KafkaPythonProducer) -> list[Delivery]:
    deliveries: list[Delivery] = []
    recs = recs_for()
    for i in range(0, len(recs), 37):  # several calls, as chunks come
        q = producer.produce_many(recs[i : i + 37])
        assert q.refused is None
        deliveries += q.deliveries
    producer.flush(TIMEOUT)
    producer.close(5)
    assert all(d.done and d.error is None for d in deliveries)
    return deliveries


def _read(broker: Broker, topic: str, n: int) -> dict[int, list[tuple[int, Any, Any, list[Any]]]]:
    out: dict[int, list[tuple[int, Any, Any, list[Any]]]] = {}
    for m in read_topic(broker.bootstrap, topic, at_least=n, timeout=TIMEOUT):
        out.setdefault(m.partition, []).append((m.offset, m.key, m.value, list(m.headers)))
    assert sum(map(len, out.values())) == n
    return out


def test_both_paths_land_the_same_records(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    topics = {
        path: (fresh_topic(broker, f"pm-{path}-1"), fresh_topic(broker, f"pm-{path}-3", 3))
        for path in ("fast", "send")
    }

    def recs_for(path: str) -> list[OutputRecord]:
        one, three = topics[path]
        # Key-less records only on the one-partition topic: on three, the partitioner spreads
        # them at random on either path.
        return [*_records(one), *(r for r in _records(three) if r.key is not None)]

    fast = _producer(broker.bootstrap)
    assert kp._Appender.usable(fast.client)
    deliveries = _land(broker, lambda: recs_for("fast"), fast)
    assert all(isinstance(d, kp._RecordDelivery) for d in deliveries)  # the appender queued them all
    monkeypatch.setattr(kp, "APPENDER_VERSIONS", frozenset())
    plain = _producer(broker.bootstrap)
    assert plain._appender is None and not kp._Appender.usable(plain.client)
    deliveries = _land(broker, lambda: recs_for("send"), plain)
    assert not any(isinstance(d, kp._RecordDelivery) for d in deliveries)
    for fast_topic, send_topic in zip(topics["fast"], topics["send"], strict=True):
        n = sum(r.topic == fast_topic for r in recs_for("fast"))
        landed_fast, landed_send = _read(broker, fast_topic, n), _read(broker, send_topic, n)
        assert landed_fast == landed_send
        if fast_topic == topics["fast"][1]:
            assert len(landed_fast) == 3, "keyed records spread over the three partitions"


def _bad_records(topic: str) -> dict[str, OutputRecord]:
    return {
        "headers not a list": OutputRecord(topic, b"k", b"v", (("a", b"1"),)),
        "a header name not str": OutputRecord(topic, b"k", b"v", [(b"a", b"1")]),  # type: ignore[list-item]
        "a header value not bytes": OutputRecord(topic, b"k", b"v", [("a", "1")]),  # type: ignore[list-item]
        "a header not a pair": OutputRecord(topic, b"k", b"v", [("a", b"1", b"2")]),  # type: ignore[list-item]
        "a header name with a lone surrogate": OutputRecord(topic, b"k", b"v", [("\ud800", b"1")]),
        "a key not bytes": OutputRecord(topic, "k", b"v", []),  # type: ignore[arg-type]
        "a key not bytes and a bad header": OutputRecord(topic, "k", b"v", [("a", 1)]),  # type: ignore[arg-type,list-item]
        "a value not bytes and an unencodable name": OutputRecord(topic, b"k", 1, [("\ud800", b"")]),  # type: ignore[arg-type]
        "neither key nor value": OutputRecord(topic, None, None, []),
        "too large": OutputRecord(topic, b"k", b"x" * 5000, [("a", b"1")]),
    }


@pytest.mark.parametrize("kind", list(_bad_records("t")))
def test_a_refused_record_stops_the_batch_with_sends_reason(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    reasons = {}
    for path in ("fast", "send"):
        if path == "send":
            monkeypatch.setattr(kp, "APPENDER_VERSIONS", frozenset())
        topic = fresh_topic(broker, f"pm-refused-{path}")
        producer = _producer(broker.bootstrap, max_request_size=4096)
        before, after = OutputRecord(topic, b"a", b"before", []), OutputRecord(topic, b"c", b"after", [])
        q = producer.produce_many([before, _bad_records(topic)[kind], after])
        assert len(q.deliveries) == 1 and q.refused is not None, path
        reasons[path] = str(q.refused)
        producer.flush(TIMEOUT)
        producer.close(5)
        assert [m.value for m in read_topic(broker.bootstrap, topic, at_least=1, timeout=TIMEOUT)] == [
            b"before"
        ]
    assert reasons["fast"] == reasons["send"]


def test_a_wrapped_send_is_honoured(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Instrumentation that wraps ``KafkaProducer.send`` (tracing, tests) sees every record."""
    topic = fresh_topic(broker, "pm-wrapped")
    seen: list[Any] = []
    original = KafkaProducer.send

    def send(self: KafkaProducer, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("key"))
        return original(self, *args, **kwargs)

    producer = _producer(broker.bootstrap)
    monkeypatch.setattr(KafkaProducer, "send", send)
    recs = _records(topic, 20)
    assert producer.produce_many(recs).refused is None
    monkeypatch.undo()
    producer.client.send = send.__get__(producer.client)  # on the instance
    assert producer.produce_many(recs).refused is None
    producer.flush(TIMEOUT)
    producer.close(5)
    assert seen == [r.key for r in recs] * 2


def test_produce_many_on_every_backend(broker: Broker, kafka_client: str) -> None:
    """The protocol: in order, stopping at the first record refused (the rest not tried)."""
    topic = fresh_topic(broker, "pm-backend")
    p = open_broker(KafkaSettings(client=kafka_client, bootstrap_servers=broker.bootstrap)).producer()
    big = b"x" * (p.max_request_size + 1)
    recs = [OutputRecord(topic, f"k{i}".encode(), f"v{i}".encode(), [("n", b"%d" % i)]) for i in range(5)]
    q = p.produce_many([*recs[:3], OutputRecord(topic, b"big", big, []), *recs[3:]])
    assert len(q.deliveries) == 3 and q.refused is not None
    q2 = p.produce_many(recs[3:])
    assert len(q2.deliveries) == 2 and q2.refused is None
    p.flush(TIMEOUT)
    assert all(d.done and d.error is None for d in q.deliveries + q2.deliveries)
    p.close(5)
    landed = read_topic(broker.bootstrap, topic, at_least=5, timeout=TIMEOUT)
    assert [(m.key, m.value, list(m.headers)) for m in landed] == [
        (r.key, r.value, list(r.headers)) for r in recs
    ]


# -- the headers of a chunk's quarantine copies -------------------------------------------------
def test_quarantine_headers_a_chunk_at_a_time_equal_one_at_a_time() -> None:
    """``ChunkHeaders.quarantine_many`` formats a column at a time; every header must be what
    the one-message form always wrote (``repr`` of the float, ``nan`` for NaN and None)."""
    h = ChunkHeaders("events", 4, 3, 9)
    values: list[float | None] = [
        0.1,
        -0.0,
        1e-320,
        1.7976931348623157e308,
        float("inf"),
        float("nan"),
        None,
        3,
        -2.5e-7,
    ]
    originals: list[Any] = [None, [], [("trace", b"t"), ("reason", b"input's own, replaced")]]
    n = len(values)
    got = h.quarantine_many(
        [originals[i % 3] for i in range(n)],
        [10**12 + i for i in range(n)],
        reasons=["influence", "ref_loss"] * (n // 2) + ["influence"] * (n % 2),
        influence=values,
        relative_influence=values[::-1],
        cosine_influence=values,
        threshold=[0.5] * n,
    )
    for i in range(n):
        expected = [
            *([("trace", b"t")] if i % 3 == 2 else []),
            ("source_topic", b"events"),
            ("source_partition", b"4"),
            ("source_offset", str(10**12 + i).encode()),
            ("reason", (b"influence", b"ref_loss")[i % 2] if i < n - n % 2 else b"influence"),
            ("influence", _num(values[i])),
            ("relative_influence", _num(values[n - 1 - i])),
            ("cosine_influence", _num(values[i])),
            ("threshold", b"0.5"),
            ("policy_version", b"3"),
            ("model_version", b"9"),
        ]
        assert got[i] == expected
    assert [dict(got[i])["influence"] for i in (5, 6, 7)] == [b"nan", b"nan", b"3.0"]
    assert h.source_many([7, 8]) == [h.source(7), h.source(8)]


def test_timestamps_are_taken_once_per_call() -> None:
    """The one difference from ``send``: a call's records share a create timestamp."""
    tp = KafkaTP("out", 0)
    acc = RecordAccumulator(batch_size=1 << 20, message_version=2)
    appender = kp._Appender(acc, 1_048_576, wakeup=lambda: None)
    recs = _records("out", 3)
    now = int(time.time() * 1000)
    appender.append(
        tp, [(appender.encode(r.key, r.value, r.headers), kp._RecordDelivery(r)) for r in recs], now
    )
    (batch,) = acc._batches[tp]
    batch.records.close()
    from kafka.record.memory_records import MemoryRecords

    stamps = [rec.timestamp for b in MemoryRecords(batch.records.buffer()) for rec in b]
    assert stamps == [now] * 3
