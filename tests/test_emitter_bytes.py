"""What the emitter produces for a chunk, pinned record by record: topic, key, value, every header
(name, bytes, order) and the order of the records — on an in-memory producer and, read back from
the real broker, on each backend's producer (partition included).

The expected records are spelled out here from the output contract (docs/architecture.md,
"Output headers"; ``repr`` of each float64 score, ``nan`` for a missing one), one record at a time
in plain Python, independently of how the emitter builds them, so that a faster build (column-wise
headers, batched keys) must produce the very same bytes.  The chunk's scores are chosen to cover
every way a float is written (small, large, negative zero, NaN, infinities, shortest-repr
boundaries), and its messages every header case (none, an input header kept, an input header of
ours replaced), a non-ASCII id and an id that cannot be encoded as a key (its copy dead-letters it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from stream_influence.config import AppSettings, KafkaSettings
from stream_influence.core.engine import BatchResult, InfluenceEngine
from stream_influence.core.influence import Scores
from stream_influence.io.broker import (
    Delivery,
    OutputRecord,
    Queued,
    Record,
    TopicPartition,
    open_broker,
    produce_each,
)
from stream_influence.io.records import OUTPUT_FAILED, OWN_HEADERS, decision_value
from stream_influence.service.emitter import Emitter
from tests.fixtures.broker import Broker, fresh_topic
from tests.fixtures.service_events import read_topic

TIMEOUT = 30.0  # generous: the machine may be loaded
N = 40
POLICY_VERSION, MODEL_VERSION = 3, 17
FLOATS = [
    0.10900459118,
    -0.0032460403,
    1e-05,  # repr switches to an exponent below 1e-4
    -9.999999999999999e-05,
    0.0001,
    4.051290683605165e-06,
    0.0,
    -0.0,
    1.0,
    1e16,
    9999999999999998.0,
    1.7976931348623157e308,
    5e-324,
    float("nan"),
    1 / 3,
    123456.789,
]
# Only in the thresholds: a decision record (JSON) holds no infinity.
THRESHOLDS = [*FLOATS, float("inf"), -float("inf")]


class MemoryProducer:
    """Keeps every record it is given, in order; every delivery succeeds at flush."""

    max_request_size = 1_048_576

    def __init__(self) -> None:
        self.sent: list[OutputRecord] = []
        self._pending: list[Delivery] = []

    def produce(self, record: OutputRecord) -> Delivery:
        d = Delivery(record)
        self._pending.append(d)
        self.sent.append(record)
        return d

    def produce_many(self, records: Sequence[OutputRecord]) -> Queued:
        return produce_each(self.produce, records)

    def flush(self, timeout_s: float) -> None:
        for d in self._pending:
            d.resolve()
        self._pending = []

    def close(self, timeout_s: float) -> None:
        pass


def _event_id(i: int) -> str:
    if i == 7:
        return "é-ünïcode-7"
    return f"ev-{i}"


def _chunk(topic: str) -> tuple[list[Record], BatchResult]:
    """N messages (two of them invalid) and a hand-made result: quarantine every other valid
    event, scores from FLOATS."""
    d = 3
    raws: list[bytes] = []
    for i in range(N):
        if i in (5, 23):
            raws.append(b"not json %d" % i)
        else:
            raws.append(
                json.dumps({"id": _event_id(i), "features": [i * 0.5, 1.0, -2.0], "label": i % 3}).encode()
            )
    headers: list[Any] = []
    for i in range(N):
        if i % 3 == 0:
            headers.append(())
        elif i % 3 == 1:
            headers.append([("trace", b"t-%d" % i)])
        else:  # an input header we write ourselves is replaced, the rest kept in order
            headers.append([("reason", b"theirs"), ("trace", b"x"), ("source_offset", b"9")])
    msgs = [
        Record(topic, 4, 7000 + 3 * i, b"in-key" if i % 2 else None, v, h, 1_700_000_000_000 + i)
        for i, (v, h) in enumerate(zip(raws, headers, strict=True))
    ]
    engine = InfluenceEngine(AppSettings(engine={"schema": {"classes": [0, 1, 2], "n_features": d}}).engine)
    batch, rejects = engine.decode(raws)
    n = len(batch)
    assert n == N - 2 and len(rejects) == 2
    # An id that cannot be a UTF-8 key (the decoder refuses one; a copy's key must not fail the chunk).
    batch.ids[12] = "lone-\ud800-surrogate"  # a quarantined one (every even row)
    col = np.array([FLOATS[(j * 5 + s) % len(FLOATS)] for s in range(3) for j in range(n)]).reshape(3, n)
    thresholds = np.array([THRESHOLDS[(j * 7) % len(THRESHOLDS)] for j in range(n)])
    quarantine = np.arange(n) % 2 == 0
    result = BatchResult(
        events=batch,
        rejects=rejects,
        quarantine=quarantine,
        reasons=["influence" if j % 4 else "reference_loss" for j in range(n)],
        scores=Scores(col[0], col[1], col[2], col[0] / 2),
        threshold=0.0,
        policy_version=POLICY_VERSION,
        model_version=MODEL_VERSION,
        alarm=False,
        n_input=N,
        thresholds=thresholds,
    )
    return msgs, result


def _b(x: float) -> bytes:
    return b"nan" if math.isnan(x) else repr(float(x)).encode()


def _expected(k: KafkaSettings, tp: TopicPartition, msgs: list[Record], r: BatchResult) -> list[tuple]:
    """The chunk's outputs, one record at a time, from the contract."""
    src = [("source_topic", tp.topic.encode()), ("source_partition", str(tp.partition).encode())]

    def kept(m: Record) -> list[tuple[str, bytes]]:
        return [(n, v) for n, v in m.headers if n not in OWN_HEADERS]

    out: list[tuple] = []
    for rej in r.rejects:
        m = msgs[rej.index]
        out.append(
            (
                k.dead_letter_topic,
                m.key,
                m.value,
                [
                    *kept(m),
                    ("reason", rej.reason.value.encode()),
                    ("detail", rej.detail.encode("utf-8", "replace")),
                    *src,
                    ("source_offset", str(m.offset).encode()),
                ],
            )
        )
    failed: dict[int, str] = {}
    for j in range(len(r.events)):
        if not r.quarantine[j]:
            continue
        i = int(r.events.index[j])
        m = msgs[i]
        eid = r.events.ids[j]
        try:
            key = eid.encode()
        except UnicodeEncodeError as exc:
            why = f"quarantine copy: the event id cannot be encoded as UTF-8: {exc}"
            failed[i] = why
            out.append(
                (
                    k.dead_letter_topic,
                    m.key,
                    m.value,
                    [
                        *kept(m),
                        ("reason", OUTPUT_FAILED.encode()),
                        ("detail", why.encode("utf-8", "replace")),
                        *src,
                        ("source_offset", str(m.offset).encode()),
                    ],
                )
            )
            continue
        s = r.scores
        out.append(
            (
                k.quarantine_topic,
                key,
                m.value,
                [
                    *kept(m),
                    *src,
                    ("source_offset", str(m.offset).encode()),
                    ("reason", r.reasons[j].encode()),
                    ("influence", _b(s.influence[j])),
                    ("relative_influence", _b(s.relative_influence[j])),
                    ("cosine_influence", _b(s.cosine_influence[j])),
                    ("threshold", _b(r.thresholds[j])),
                    ("policy_version", str(POLICY_VERSION).encode()),
                    ("model_version", str(MODEL_VERSION).encode()),
                ],
            )
        )
    assert failed, "the chunk must exercise a copy that cannot be built"
    for j in range(len(r.events)):
        if r.quarantine[j]:
            continue
        m = msgs[int(r.events.index[j])]
        try:
            key = r.events.ids[j].encode()
        except UnicodeEncodeError:
            key = f"{tp.topic}-{tp.partition}-{m.offset}".encode()
        out.append((k.accepted_topic, key, m.value, [*src, ("source_offset", str(m.offset).encode())]))
    for i, rec in enumerate(r.records()):
        m = msgs[i]
        if i in failed:
            rec = {**rec, "decision": "dead_letter", "reason": OUTPUT_FAILED, "detail": failed[i]}
        try:
            key = rec["id"].encode() if rec["id"] is not None else None
        except UnicodeEncodeError:
            key = None
        if key is None:
            key = f"{tp.topic}-{tp.partition}-{m.offset}".encode()
        out.append((k.decisions_topic, key, decision_value(rec, tp.topic, tp.partition, m.offset), []))
    return out


def _settings(**kafka: Any) -> KafkaSettings:
    return KafkaSettings(
        quarantine_topic="out.quarantine",
        dead_letter_topic="out.dead-letter",
        accepted_topic="out.accepted",
        decisions_topic="out.decisions",
        **kafka,
    )


def _as_tuples(recs: Sequence[Any]) -> list[tuple]:
    return [(r.topic, r.key, r.value, list(r.headers)) for r in recs]


def test_a_chunks_outputs_are_exactly_the_contracts_records() -> None:
    k = _settings()
    tp = TopicPartition("events", 4)
    msgs, result = _chunk(tp.topic)
    producer = MemoryProducer()
    emitter = Emitter(k, lambda kind, n: None)
    emitter.producer = producer
    emitter.emit(tp, msgs, result)
    emitter.settle(5.0)
    got = _as_tuples(producer.sent)
    want = _expected(k, tp, msgs, result)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == w
    # Every header is (str, bytes), as both clients require.
    assert all(type(n) is str and type(v) is bytes for r in producer.sent for n, v in r.headers)
    assert emitter.inflight == []


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_the_same_bytes_reach_the_broker_on_each_backend(broker: Broker, client: str) -> None:
    if client == "confluent":
        pytest.importorskip("confluent_kafka")
    topics = {kind: fresh_topic(broker, f"pin-{client}-{kind}") for kind in ("q", "dl", "acc", "dec")}
    k = KafkaSettings(
        client=client,
        bootstrap_servers=broker.bootstrap,
        quarantine_topic=topics["q"],
        dead_letter_topic=topics["dl"],
        accepted_topic=topics["acc"],
        decisions_topic=topics["dec"],
    )
    tp = TopicPartition("events", 4)
    msgs, result = _chunk(tp.topic)
    emitter = Emitter(k, lambda kind, n: None)
    emitter.producer = open_broker(k).producer()
    try:
        emitter.emit(tp, msgs, result)
        emitter.settle(TIMEOUT)
    finally:
        emitter.producer.close(5)
    want = _expected(k, tp, msgs, result)
    for topic in topics.values():
        expected = [w for w in want if w[0] == topic]
        back = read_topic(broker.bootstrap, topic, at_least=len(expected), timeout=TIMEOUT)
        got = [(topic, r.key, r.value, [(n, v) for n, v in r.headers]) for r in back]
        assert got == expected, topic
        assert {r.partition for r in back} == {0}
