"""The kafka-python backend's fetch path (``io/kafka_python._PlainRecords`` over
``io/record_batches.read_batches``) against kafka-python's own parser.

The fast path must hand out what the client's ``PartitionRecords`` hands out.  Checked two ways:
in memory, on record batches built by kafka-python's own batch builder (every field, and the
state the fetcher reads after each ``take``: next fetch offset, leader epoch, records and bytes
read, the drain), over generated batches — null and non-null keys and values, headers (none,
many, duplicates, empty and null values), offset gaps, log-append time, several batches, a fetch
offset inside a batch, a batch cut off at the end, compressed and control batches, corrupted
bytes; and on the real broker, consuming the same topic through the backend and through a plain
``KafkaConsumer``: record batches of several sizes, tombstones, offsets after a seek, a gzip
topic, a committed transaction (its control batch), a batch whose CRC is wrong, and a release the
fast path was not written for.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KafkaTP
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.errors import CorruptRecordError
from kafka.record import MemoryRecords
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.util import calc_crc32c

from stream_influence.config import KafkaSettings
from stream_influence.io import kafka_python as kp
from stream_influence.io.broker import Record, TopicPartition, open_broker
from stream_influence.io.record_batches import read_batches
from tests.fixtures.broker import Broker, fresh_topic

TIMEOUT = 30.0  # generous: the machine may be loaded
TP = KafkaTP("events", 3)


def fields(r: Any) -> tuple[Any, ...]:
    """What :class:`~stream_influence.io.broker.ConsumedRecord` names, in one tuple."""
    return (r.topic, r.partition, r.offset, r.timestamp, r.key, r.value, r.headers)


# -- in memory: batches built by kafka-python ------------------------------------------------
def batch_bytes(
    records: Sequence[tuple[int, int, bytes | None, bytes | None, list[tuple[str, bytes | None]]]],
    *,
    base_offset: int = 0,
    epoch: int = 0,
    compression: int = 0,
    log_append: bool = False,
    control: bool = False,
) -> bytes:
    """One v2 batch of ``(offset_delta, timestamp, key, value, headers)`` records, as the broker
    stores it: base offset and leader epoch set, attributes as asked, CRC recomputed."""
    b = DefaultRecordBatchBuilder(2, compression, False, -1, -1, -1, batch_size=1 << 30)
    for delta, ts, key, value, headers in records:
        assert b.append(delta, ts, key, value, headers) is not None
    buf = bytearray(b.build())
    struct.pack_into(">q", buf, 0, base_offset)
    struct.pack_into(">i", buf, 12, epoch)
    attrs = struct.unpack_from(">h", buf, 21)[0] | (0x08 if log_append else 0) | (0x20 if control else 0)
    struct.pack_into(">h", buf, 21, attrs)
    struct.pack_into(">I", buf, 17, calc_crc32c(memoryview(buf)[21:]))
    return bytes(buf)


def partition_records(cls: type, buf: bytes, fetch_offset: int, check_crcs: bool = True) -> Any:
    drains: list[Any] = []
    part = cls(fetch_offset, TP, MemoryRecords(buf), check_crcs=check_crcs, on_drain=drains.append)
    part.test_drains = drains
    return part


def outcome(part: Any, n: int | None) -> tuple[Any, ...]:
    """One ``take`` and the fetcher-visible state after it."""
    try:
        got: Any = [fields(r) for r in part.take(n)]
    except Exception as exc:
        got = (type(exc), str(exc))
    return (
        got,
        part.next_fetch_offset,
        part.leader_epoch,
        part.records_read,
        part.bytes_read,
        bool(part),
        len(part.test_drains),
    )


def compare(buf: bytes, fetch_offset: int, takes: Sequence[int | None], check_crcs: bool = True) -> Any:
    """Take the same sizes from kafka-python's ``PartitionRecords`` and from ``_PlainRecords``;
    equal results and state after each, up to the first error.  Returns the fast part."""
    stock = partition_records(Fetcher.PartitionRecords, buf, fetch_offset, check_crcs)
    fast = partition_records(kp._PlainRecords, buf, fetch_offset, check_crcs)
    for n in takes:
        if not stock:
            break
        want, got = outcome(stock, n), outcome(fast, n)
        if isinstance(want[0], tuple):  # an error: the same one; then drained (see _PlainRecords)
            assert got[0] == want[0]
            assert not fast
            break
        assert got == want
    return fast


def rec(i: int, ts: int = 1_790_000_000_000, **kw: Any) -> tuple[Any, ...]:
    return (
        kw.get("delta", i),
        ts + kw.get("dt", i),
        kw.get("key", b"k%d" % i),
        kw.get("value", b"v" * i),
        kw.get("headers", []),
    )


def test_every_field_and_the_fetch_state_equal_the_clients() -> None:
    batches = [
        batch_bytes([rec(i) for i in range(7)], base_offset=100, epoch=4),
        batch_bytes(
            [
                rec(0, key=None, value=None),  # tombstone without a key
                rec(1, key=b"", value=b""),
                rec(2, headers=[("a", b"1"), ("a", b"2"), ("empty", b""), ("null", None), ("café-ß", b"x")]),
                rec(3, value=b"x" * 70_000, key=b"y" * 9000, dt=-50_000),  # 3-byte varints, negative delta
                rec(9, delta=9, dt=10**9),  # an offset gap (compaction), a long timestamp delta
            ],
            base_offset=107,
            epoch=5,
        ),
        batch_bytes(
            [rec(i, headers=[("h", b"%d" % i)] * 3) for i in range(3)], base_offset=117, log_append=True
        ),
    ]
    buf = b"".join(batches)
    fast = compare(buf, 100, [1, 3, 3, 2, 100])
    assert fast._read is not None  # the fast path read it
    for takes in ([None], [7], [7, 1], [15], [15, 1], [2] * 10, [16]):
        compare(buf, 100, takes)
    # A fetch from inside a batch, and one past a batch's last record (the gap): the records
    # before the fetch offset are left out; then a batch cut off at the end of the fetch.
    for at in (103, 107, 112, 116, 117, 119, 120):
        compare(buf, at, [2, 2, 50])
        compare(buf, at, [None])
    compare(buf[:-10], 100, [4, 100])
    compare(buf + batches[0][:30], 100, [None])
    compare(b"", 0, [None, 5])


def test_records_are_light_and_carry_what_the_service_reads() -> None:
    buf = batch_bytes([rec(i) for i in range(3)], base_offset=10)
    fetched = read_batches(buf, "events", 3, 0, calc_crc32c)
    assert fetched is not None
    r = fetched.records[1]
    assert isinstance(r, Record) and not hasattr(r, "__dict__")
    assert fields(r) == ("events", 3, 11, 1_790_000_000_001, b"k1", b"v", [])


@pytest.mark.parametrize(
    "kind", ["gzip", "control", "crc", "value_past_end", "stated_length", "header_name", "magic1"]
)
def test_whatever_the_fast_path_does_not_vouch_for_takes_the_clients_path(kind: str) -> None:
    good = batch_bytes([rec(i, headers=[("h", b"x")]) for i in range(4)], base_offset=0)
    after = batch_bytes([rec(i) for i in range(3)], base_offset=4)
    if kind == "gzip":
        bad = batch_bytes([rec(i, value=b"z" * 500) for i in range(4)], base_offset=4, compression=1)
        assert bad[22] & 0x07 == 1  # compressed (the builder sends it plain where gzip would not pay)
    elif kind == "control":
        bad = batch_bytes(
            [(0, 1, b"\x00\x00\x00\x01", b"\x00\x00\x00\x00\x00\x00", [])], base_offset=4, control=True
        )
    else:
        buf = bytearray(batch_bytes([rec(i, headers=[("h", b"x")]) for i in range(4)], base_offset=4))
        if kind == "crc":
            buf[-1] ^= 1
        elif kind == "magic1":
            buf[16] = 1
        else:
            at = bytes(buf).index(b"k0") - 2  # the first record's attributes
            if kind == "value_past_end":
                at = bytes(buf).index(b"v" * 3) - 1  # the third record's value length (3 → 0x06)
                buf[at] = 0x7E
            elif kind == "stated_length":
                buf[61] += 2
            else:
                buf[bytes(buf).index(b"h\x02x")] = 0xFF  # a header name that is not UTF-8
            struct.pack_into(">I", buf, 17, calc_crc32c(memoryview(buf)[21:]))  # only the CRC is right
        bad = bytes(buf)
    buf = good + bad + after
    assert read_batches(buf, "events", 3, 0, calc_crc32c) is None
    for takes in ([2, 2, 2, 2, 5, 5], [None, None], [4, 1], [100]):
        fast = compare(buf, 0, takes)
        assert fast._read is None
    # Without check_crcs the client reads a batch with a wrong CRC; so does the fast path.
    if kind == "crc":
        fast = compare(buf, 0, [None], check_crcs=False)
        assert fast._read is not None


_bytes = st.one_of(st.none(), st.binary(max_size=40), st.binary(min_size=60, max_size=9000))
_headers = st.lists(
    st.tuples(st.sampled_from(["a", "b", "trace", "café", ""]), st.one_of(st.none(), st.binary(max_size=20))),
    max_size=4,
)
_record = st.tuples(st.integers(0, 3), st.integers(-(10**6), 10**9), _bytes, _bytes, _headers)
_batch = st.tuples(
    st.lists(_record, min_size=1, max_size=8),
    st.booleans(),
    st.integers(0, 20),
    st.sampled_from([0, 0, 0, 1]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(_batch, min_size=1, max_size=4),
    fetch_skip=st.integers(0, 12),
    cut=st.integers(0, 80),
    flip=st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.integers(1, 255))),
    takes=st.lists(st.one_of(st.none(), st.integers(1, 12)), min_size=1, max_size=8),
    check_crcs=st.booleans(),
)
def test_generated_fetches_read_as_the_client_reads_them(
    batches: list[Any],
    fetch_skip: int,
    cut: int,
    flip: tuple[int, int] | None,
    takes: list[int | None],
    check_crcs: bool,
) -> None:
    """Any fetch: the same records, state and errors as the client's parser (cut off at the end,
    a byte corrupted, compressed batches, log-append time, offset gaps)."""
    parts, base = [], 50
    for recs, log_append, epoch, compression in batches:
        deltas, offset = [], 0
        for gap, ts, key, value, headers in recs:
            deltas.append((offset, ts, key, value, headers))
            offset += 1 + gap
        parts.append(
            batch_bytes(deltas, base_offset=base, epoch=epoch, compression=compression, log_append=log_append)
        )
        base += offset
    buf = b"".join(parts)
    if cut and cut < len(buf):
        buf = buf[:-cut]
    if flip is not None and buf:
        at = flip[0] % len(buf)
        buf = buf[:at] + bytes([buf[at] ^ flip[1]]) + buf[at + 1 :]
    compare(buf, 50 + fetch_skip, takes, check_crcs)


# -- the real broker: the backend against a plain KafkaConsumer -------------------------------
def produce(bootstrap: str, topic: str, sends: Sequence[dict[str, Any]], **opts: Any) -> None:
    p = KafkaProducer(bootstrap_servers=bootstrap, **opts)
    try:
        for kw in sends:
            p.send(topic, **kw)
        p.flush(TIMEOUT)
    finally:
        p.close(TIMEOUT)


def consume_stock(bootstrap: str, topic: str, n: int, *, start: int = 0, max_records: int = 37) -> list[Any]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tp = KafkaTP(topic, 0)
        c.assign([tp])
        c.seek(tp, start)
        return _drain(lambda: c.poll(timeout_ms=200, max_records=max_records), n)
    finally:
        c.close()


def consume_backend(
    bootstrap: str, topic: str, n: int, *, start: int = 0, max_records: int = 37
) -> tuple[list[Any], Any]:
    c = open_broker(KafkaSettings(bootstrap_servers=bootstrap, topic=topic)).consumer(group=False)
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        c.seek(tp, start)
        got = _drain(lambda: c.poll(200, max_records), n)
        return got, c
    finally:
        c.close(5000)


def _drain(poll: Callable[[], Any], n: int) -> list[Any]:
    out: list[Any] = []
    deadline = time.monotonic() + TIMEOUT
    while len(out) < n and time.monotonic() < deadline:
        for msgs in poll().values():
            out.extend(msgs)
    assert len(out) == n, f"read {len(out)} of {n} records"
    return out


def shapes(n: int) -> list[dict[str, Any]]:
    """Keys null and not, tombstones, empty values, headers none/many/duplicated/empty, values
    past one- and two-byte length varints."""
    out = []
    for i in range(n):
        key = None if i % 3 == 1 else b"id-%d" % i
        value = None if i % 11 == 0 else (b"" if i % 13 == 0 else b"v%d" % i * (1 + i * 37 % 3000))
        if key is None and value is None:
            key = b"tomb-%d" % i
        headers = [] if i % 2 else [("trace", b"t-%d" % i), ("dup", b"1"), ("dup", b"2"), ("empty", b"")]
        if i % 7 == 3:
            headers = [(f"h{j}", b"x" * j) for j in range(12)]
        out.append({"key": key, "value": value, "headers": headers})
    return out


@pytest.mark.integration
@pytest.mark.parametrize("batch_size", [300, 16_384, 1_000_000])
def test_the_backend_reads_what_kafka_python_reads(broker: Broker, batch_size: int) -> None:
    topic = fresh_topic(broker, "fetch")
    sends = shapes(400)
    produce(broker.bootstrap, topic, sends, batch_size=batch_size, linger_ms=20)
    want = consume_stock(broker.bootstrap, topic, len(sends))
    for max_records in (1, 37, 512):
        got, consumer = consume_backend(broker.bootstrap, topic, len(sends), max_records=max_records)
        assert consumer.plain_fetches
        assert all(type(r) is Record for r in got)  # the fast path read every fetch
        assert [fields(r) for r in got] == [fields(r) for r in want]
    assert [(r.key, r.value, r.headers) for r in want] == [
        (s["key"], s["value"], s["headers"]) for s in sends
    ]


@pytest.mark.integration
def test_offsets_after_a_seek_and_the_position_equal_kafka_pythons(broker: Broker) -> None:
    topic = fresh_topic(broker, "fetch-seek")
    sends = shapes(300)
    produce(broker.bootstrap, topic, sends, batch_size=4096, linger_ms=20)
    for start in (1, 57, 150, 299):
        want = consume_stock(broker.bootstrap, topic, len(sends) - start, start=start, max_records=16)
        got, _ = consume_backend(broker.bootstrap, topic, len(sends) - start, start=start, max_records=16)
        assert got[0].offset == start
        assert [fields(r) for r in got] == [fields(r) for r in want]
    c = open_broker(KafkaSettings(bootstrap_servers=broker.bootstrap, topic=topic)).consumer(group=False)
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        c.seek(tp, 100)
        _drain(lambda: c.poll(200, 50), 200)
        assert c.position(tp) == 300 == c.highwater(tp)
    finally:
        c.close(5000)


@pytest.mark.integration
def test_a_compressed_topic_takes_kafka_pythons_path(broker: Broker) -> None:
    topic = fresh_topic(broker, "fetch-gzip")
    sends = shapes(120)
    produce(broker.bootstrap, topic, sends, compression_type="gzip", linger_ms=20)
    want = consume_stock(broker.bootstrap, topic, len(sends))
    got, consumer = consume_backend(broker.bootstrap, topic, len(sends))
    assert consumer.plain_fetches
    assert all(type(r) is ConsumerRecord for r in got)  # read by kafka-python
    assert [fields(r) for r in got] == [fields(r) for r in want]


@pytest.mark.integration
def test_a_transaction_and_its_control_batch_read_as_kafka_python_reads_them(broker: Broker) -> None:
    topic = fresh_topic(broker, "fetch-txn")
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, transactional_id=f"{topic}-tx")
    try:
        p.init_transactions()
        p.begin_transaction()
        for i in range(5):
            p.send(topic, value=b"in-txn-%d" % i, headers=[("n", b"%d" % i)])
        p.commit_transaction()
    finally:
        p.close(TIMEOUT)
    produce(broker.bootstrap, topic, [{"value": b"after-%d" % i} for i in range(6)], linger_ms=20)
    want = consume_stock(broker.bootstrap, topic, 11)
    got, _ = consume_backend(broker.bootstrap, topic, 11, max_records=4)
    assert [fields(r) for r in got] == [fields(r) for r in want]
    assert [r.value for r in got[:5]] == [b"in-txn-%d" % i for i in range(5)]
    assert got[5].offset == 6  # offset 5 is the commit marker, which no consumer returns


@pytest.mark.integration
def test_a_batch_with_a_wrong_crc_raises_kafka_pythons_error(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = fresh_topic(broker, "fetch-crc")
    produce(broker.bootstrap, topic, [{"value": b"good-%d" % i} for i in range(5)], linger_ms=20)
    build = DefaultRecordBatchBuilder.build

    def corrupt(self: Any) -> bytearray:
        buf = build(self)
        buf[-1] ^= 1  # after the CRC was computed: the broker stores what it is sent
        return buf

    monkeypatch.setattr(DefaultRecordBatchBuilder, "build", corrupt)
    produce(
        broker.bootstrap,
        topic,
        [{"value": b"bad-%d" % i} for i in range(5)],
        linger_ms=20,
        enable_idempotence=False,
    )
    monkeypatch.undo()

    def errors(poll: Callable[[], Any], polls: int) -> tuple[list[bytes], list[str]]:
        values, errs = [], []
        deadline = time.monotonic() + TIMEOUT
        while len(errs) < polls and time.monotonic() < deadline:
            try:
                for msgs in poll().values():
                    values.extend(r.value for r in msgs)
            except CorruptRecordError as exc:
                errs.append(str(exc))
        return values, errs

    stock = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, enable_auto_commit=False)
    stock.assign([KafkaTP(topic, 0)])
    stock.seek(KafkaTP(topic, 0), 0)
    want = errors(lambda: stock.poll(timeout_ms=200, max_records=3), 1)  # its next poll never returns
    stock.close()
    c = open_broker(KafkaSettings(bootstrap_servers=broker.bootstrap, topic=topic)).consumer(group=False)
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        c.seek(tp, 0)
        values, errs = errors(lambda: c.poll(200, 3), 3)
        assert (values, errs[:1]) == want
        assert want[0] == [b"good-%d" % i for i in range(5)] and "failed crc check" in want[1][0]
        assert errs == want[1] * 3  # raised again at every poll, at the same offset
        assert c.position(tp) == 5
    finally:
        c.close(5000)


@pytest.mark.integration
def test_a_release_it_was_not_written_for_takes_kafka_pythons_path(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = fresh_topic(broker, "fetch-version")
    sends = shapes(50)
    produce(broker.bootstrap, topic, sends, linger_ms=20)
    monkeypatch.setattr(kp, "kafka_version", "3.0.13")
    got, consumer = consume_backend(broker.bootstrap, topic, len(sends))
    assert not consumer.plain_fetches
    assert "PartitionRecords" not in vars(consumer.client._fetcher)
    assert all(type(r) is ConsumerRecord for r in got)
    assert [fields(r) for r in got] == [fields(r) for r in consume_stock(broker.bootstrap, topic, len(sends))]


def test_a_fetcher_something_else_changed_is_left_alone() -> None:
    class Client:
        _fetcher = Fetcher.__new__(Fetcher)

    Client._fetcher.config = {"key_deserializer": None, "value_deserializer": None}
    Client._fetcher.PartitionRecords = Fetcher.PartitionRecords  # replaced by someone else
    assert not kp._plain_fetches(Client())  # type: ignore[arg-type]
    del Client._fetcher.PartitionRecords
    Client._fetcher.config["value_deserializer"] = object()
    assert not kp._plain_fetches(Client())  # type: ignore[arg-type]
    Client._fetcher.config["value_deserializer"] = None
    assert kp._plain_fetches(Client())  # type: ignore[arg-type]
    assert Client._fetcher.PartitionRecords is kp._PlainRecords


@pytest.mark.integration
def test_a_groupless_poll_0_waits_for_no_io_round_trip_while_its_fetch_is_in_flight(broker: Broker) -> None:
    """The service polls its reference reader with ``poll(0)`` every step; while that reader's
    fetch is in flight the poll returns at once, and what arrives is still read."""
    topic = fresh_topic(broker, "fetch-idle")
    c = open_broker(KafkaSettings(bootstrap_servers=broker.bootstrap, topic=topic)).consumer(group=False)
    net = c.client._manager._net
    calls = 0
    run = net.run

    def counting(*a: Any) -> Any:
        nonlocal calls
        calls += 1
        return run(*a)

    net.run = counting
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        c.seek(tp, 0)
        shortcut = 0
        deadline = time.monotonic() + TIMEOUT
        while shortcut < 5 and time.monotonic() < deadline:
            before = calls
            assert c.poll(0, 100) == {}
            shortcut += calls == before
        assert shortcut == 5  # polls that made no round trip
        produce(broker.bootstrap, topic, [{"value": b"r-%d" % i} for i in range(30)], linger_ms=20)
        got = _drain(lambda: c.poll(0, 100), 30)
        assert [r.value for r in got] == [b"r-%d" % i for i in range(30)]
    finally:
        net.run = run
        c.close(5000)
