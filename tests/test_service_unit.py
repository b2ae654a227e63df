"""Service pieces that need no broker: checkpoint files, headers, client options, CLI wiring."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_influence.cli import build_parser
from stream_influence.config import AppSettings, KafkaSettings
from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.settings import EngineSettings
from stream_influence.errors import CheckpointError, OutputError
from stream_influence.io import kafka_python
from stream_influence.io import records as kafka_io
from stream_influence.service.checkpoint import CheckpointStore
from stream_influence.service.loop import Service
from tests.fixtures.service_events import events


def _engine(n: int = 50) -> InfluenceEngine:
    e = InfluenceEngine(EngineSettings())
    e.process(events(n)[0])
    return e


def test_checkpoints_keep_latest_and_previous(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    e = _engine()
    for i in range(4):
        store.save(e, {("t", 0): 10 * i, ("t", 1): i}, {0: 5}, {"quarantine": i})
    assert [seq for seq, _ in store.paths()] == [3, 4]
    ck = store.latest()
    assert ck.seq == 4 and ck.offsets == {("t", 0): 30, ("t", 1): 3}
    assert ck.reference_offsets == {0: 5} and ck.outputs == {"quarantine": 3}
    np.testing.assert_array_equal(ck.engine.routed.theta, e.routed.theta)


def test_a_torn_latest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    e = _engine()
    store.save(e, {("t", 0): 100}, {}, {})
    store.save(e, {("t", 0): 200}, {}, {})
    latest = store.paths()[-1][1]
    latest.write_bytes(latest.read_bytes()[:100])  # what a crash without atomic writes would leave
    ck = store.latest()
    assert ck.seq == 1 and ck.offsets == {("t", 0): 100}


def test_a_checkpoint_from_other_model_settings_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_engine(), {("t", 0): 1}, {}, {})
    other = EngineSettings(curvature={"kind": "diagonal"})
    with pytest.raises(CheckpointError, match="different curvature"):
        store.latest(other)


def test_empty_directory_has_no_checkpoint(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "missing").latest() is None


def test_output_headers_carry_source_and_scores() -> None:
    original = [("trace", b"abc"), ("reason", b"spoofed")]
    dl = dict(kafka_io.dead_letter_headers(original, "invalid_json", "line 1", "events", 3, 42))
    assert dl == {
        "trace": b"abc",
        "reason": b"invalid_json",
        "detail": b"line 1",
        "source_topic": b"events",
        "source_partition": b"3",
        "source_offset": b"42",
    }
    q = kafka_io.header_dict(
        kafka_io.quarantine_headers(
            None, "events", 0, 7, reason="harmful", influence=0.5, relative_influence=0.25,
            cosine_influence=float("nan"), threshold=0.02, policy_version=2, model_version=9,
        )
    )  # fmt: skip
    assert q["source_offset"] == "7" and float(q["influence"]) == 0.5 and q["cosine_influence"] == "nan"
    assert (q["threshold"], q["policy_version"], q["model_version"]) == ("0.02", "2", "9")


def test_security_settings_and_client_options_pass_through() -> None:
    k = KafkaSettings(
        bootstrap_servers="a:9092, b:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_plain_username="u",
        sasl_plain_password="p",
        ssl_cafile=Path("/etc/ca.pem"),
        client_options={"metadata_max_age_ms": 1234, "not_a_kafka_option": 1},
    )
    opts = kafka_python.common_options(k)
    assert opts["bootstrap_servers"] == ["a:9092", "b:9093"]
    assert (opts["security_protocol"], opts["sasl_mechanism"]) == ("SASL_SSL", "PLAIN")
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("u", "p")
    assert opts["ssl_cafile"] == "/etc/ca.pem"
    passed = kafka_python._with_passthrough({}, k, {"metadata_max_age_ms": None})
    assert passed == {"metadata_max_age_ms": 1234}


def test_service_defaults_are_sane() -> None:
    cfg = AppSettings()
    assert cfg.kafka.process_batch_size >= 1 and cfg.kafka.producer_acks == "all"
    assert cfg.kafka.producer_idempotence is False  # see KafkaSettings.producer_idempotence
    assert cfg.checkpoint.keep == 2


def test_cli_has_run_produce_requeue() -> None:
    parser = build_parser()
    assert parser.parse_args(["run", "--config", "x.yaml"]).command == "run"
    assert parser.parse_args(["produce", "f.jsonl", "--topic", "t", "--quiet"]).quiet
    args = parser.parse_args(["requeue", "--from-quarantine", "--to", "t2", "--dry-run"])
    assert (args.to, args.dry_run) == ("t2", True)


def test_a_crashed_service_never_checkpoints_its_half_applied_state(tmp_path: Path) -> None:
    """After an exception in the loop the engine may hold half a batch: shutdown must not save it."""
    from stream_influence.service.loop import Service

    class _Closable:
        def close(self, *args: object, **kwargs: object) -> None:
            pass

    cfg = AppSettings.model_validate(
        {"checkpoint": {"directory": str(tmp_path / "ck")}, "metrics": {"enabled": False}}
    )
    service = Service(cfg, install_signals=False)
    service.consumer = _Closable()
    service.engine.process(events(20, seed=1)[0])
    service.dirty = True
    service.crashed = True
    assert service._shutdown() == 0
    assert CheckpointStore(tmp_path / "ck").latest() is None
    service.crashed = False  # the same state from a clean stop *is* checkpointed
    service.consumer = _Closable()
    service.producer = None
    service._shutdown()
    assert CheckpointStore(tmp_path / "ck").latest() is not None


def test_an_oversized_output_is_cut_to_the_limit_with_proof_of_the_original() -> None:
    value = bytes(range(256)) * 5000  # 1,280,000 bytes
    original = [("trace", b"t" * 100)]
    headers = kafka_io.dead_letter_headers(original, "too_large", "d", "events", 0, 7)
    rec = kafka_io.OutputRecord("dl", key=b"k", value=value, headers=headers)
    for limit in (1_048_576, 10_000, 300):
        cut = kafka_io.fit_record(rec, limit)
        size = kafka_io.record_size(cut.key, cut.value, cut.headers)
        assert size <= limit and size > limit - 16, (limit, size)  # cut to fit, not far below
        assert cut.value is not None and value.startswith(cut.value)
        h = kafka_io.header_dict(cut.headers)
        assert h["original_size"] == str(len(value))
        assert h["original_sha256"] == hashlib.sha256(value).hexdigest()
        assert (h["reason"], h["source_offset"]) == ("too_large", "7")
    # Too small even for the input's headers: they go, the service's own stay.
    assert "trace" not in kafka_io.header_dict(kafka_io.fit_record(rec, 300).headers)
    assert "trace" in kafka_io.header_dict(kafka_io.fit_record(rec, 10_000).headers)
    # What fits is left alone; what cannot fit at all is an OutputError, not a producer crash.
    small = kafka_io.OutputRecord("dl", key=b"k", value=b"v", headers=headers)
    assert kafka_io.fit_record(small, 1_048_576) is small
    with pytest.raises(OutputError):
        kafka_io.fit_record(rec, 50)


def test_record_size_is_what_the_producer_checks() -> None:
    from kafka import KafkaProducer

    p = KafkaProducer.__new__(KafkaProducer)
    p.config = {**KafkaProducer.DEFAULT_CONFIG, "api_version": (2, 8)}
    headers = [("a", b"x" * 10), ("reason", b"r")]
    for key, value in ((None, b""), (b"k", b"v" * 1000), (b"k" * 300, b"v" * 100_000)):
        assert kafka_io.record_size(key, value, headers) == p._estimate_size_in_bytes(key, value, headers)


def test_an_id_with_a_lone_surrogate_is_an_output_error() -> None:
    assert kafka_io.encode_key("é-1") == "é-1".encode()
    with pytest.raises(OutputError, match="UTF-8"):
        kafka_io.encode_key("\ud800x")


def test_a_rollback_before_the_first_checkpoint_keeps_the_reference_labels_trusted(tmp_path: Path) -> None:
    """Review item 3: with a reference topic the stream never defines a class — also after a
    rollback that finds no checkpoint yet and so starts again from an empty model."""
    import json

    from stream_influence.service.loop import Service

    cfg = AppSettings.model_validate(
        {
            "kafka": {"reference_topic": "trusted"},
            "checkpoint": {"directory": str(tmp_path / "ck")},
            "metrics": {"enabled": False},
        }
    )
    service = Service(cfg, install_signals=False)
    service._restore()  # start-up: no checkpoint
    assert service.engine.schema.trusted
    service._rollback()  # a failed window before any checkpoint exists
    assert service.engine.schema.trusted
    raws = [
        json.dumps({"id": str(i), "features": [1.0, 2.0], "label": y}).encode() for i, y in enumerate("ab")
    ]
    result = service.engine.process(raws)
    assert [r.reason for r in result.rejects] == ["unknown_label", "unknown_label"]
    assert service.engine.schema.n_classes == 0


def test_a_failed_final_checkpoint_exits_1_without_a_pointless_rollback(tmp_path: Path) -> None:
    """Review item 9: outputs not acknowledged at SIGTERM (broker down) → no checkpoint; the exit
    status says so, and the window is not reloaded from disk on the way out."""
    from stream_influence.service.loop import Service

    class _Closable:
        def close(self, *args: object, **kwargs: object) -> None:
            pass

    cfg = AppSettings.model_validate(
        {"checkpoint": {"directory": str(tmp_path / "ck")}, "metrics": {"enabled": False}}
    )
    service = Service(cfg, install_signals=False)
    service.consumer = _Closable()
    service.producer = None
    engine = service.engine
    engine.process(events(20, seed=1)[0])
    service.dirty = True
    service.send_error = RuntimeError("broker down")  # what a failed send leaves behind
    service.request_stop("SIGTERM")
    assert service._shutdown() == 1
    assert CheckpointStore(tmp_path / "ck").latest() is None
    assert service.replays == 0 and service.engine is engine  # no rollback while stopping


def test_readyz_reads_the_assignment_while_a_rebalance_changes_it(tmp_path: Path) -> None:
    """Review item 10: ready() runs on the metrics thread without the lock while the IO thread's
    rebalance hooks change the assignment; it must read a snapshot, never a set changing under it."""
    import sys
    import threading

    from kafka import TopicPartition

    from stream_influence.service.loop import Service

    cfg = AppSettings.model_validate(
        {"checkpoint": {"directory": str(tmp_path / "ck")}, "metrics": {"enabled": False}}
    )
    service = Service(cfg, install_signals=False)
    base = {TopicPartition("t", p) for p in range(2000)}
    moving = {TopicPartition("u", p) for p in range(2000)}
    service._on_assigned(base)
    snapshot = service.owned
    service._on_assigned(moving)
    assert len(snapshot) == len(base)  # what a reader held is not changed under it

    stop = threading.Event()

    def rebalance() -> None:
        while not stop.is_set():
            service._on_revoked(moving, commit=False)
            service._on_assigned(moving)

    errors: list[BaseException] = []
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to expose the race
    io = threading.Thread(target=rebalance, daemon=True)
    io.start()
    try:
        for _ in range(300):
            try:
                _, detail = service.ready()
                assert len(detail["assigned_partitions"]) in (len(base), len(base) + len(moving))
            except RuntimeError as exc:  # "Set changed size during iteration"
                errors.append(exc)
    finally:
        stop.set()
        io.join(timeout=10)
        sys.setswitchinterval(old_interval)
    assert not errors, errors[:1]


def test_a_replayed_window_follows_the_original_cut_of_a_partial_tail_chunk(tmp_path: Path) -> None:
    """Review item 11: a tail chunk cut short because the partition was caught up must be cut the
    same way when its window is rolled back and replayed, although more records have arrived —
    else the replay batches differently and may decide an event differently from the outputs
    already sent (the event would end in two places)."""
    from types import SimpleNamespace

    from kafka import TopicPartition

    from stream_influence.service.loop import Service

    tp = TopicPartition("t", 0)

    class _Consumer:
        hw = 0

        def highwater(self, _tp: TopicPartition) -> int:
            return self.hw

        def position(self, _tp: TopicPartition, timeout_ms: int = 0) -> int:
            return self.hw

        def seek(self, _tp: TopicPartition, _offset: int) -> None:
            pass

        def commit(self, *args: object, **kwargs: object) -> None:
            pass

    class _Producer:
        def flush(self, *args: object, **kwargs: object) -> None:
            pass

        def close(self, *args: object, **kwargs: object) -> None:
            pass

    cfg = AppSettings.model_validate(
        {
            "kafka": {"process_batch_size": 8},
            "checkpoint": {"directory": str(tmp_path / "ck")},
            "metrics": {"enabled": False},
        }
    )
    service = Service(cfg, install_signals=False)
    service.consumer = consumer = _Consumer()
    service.producer = _Producer()  # outputs are producible (no chunk runs without a producer)
    chunks: list[tuple[int, int]] = []

    def process(_tp: TopicPartition, msgs: list[Any], _t: float) -> None:
        chunks.append((msgs[0].offset, msgs[-1].offset + 1))
        service.next_offsets[(_tp.topic, _tp.partition)] = msgs[-1].offset + 1
        service.dirty = True

    service._process = process  # type: ignore[method-assign]
    service._on_assigned({tp})
    service.newly_assigned.clear()

    def arrive(first: int, last: int) -> None:
        consumer.hw = last
        service.pending[tp].extend(SimpleNamespace(offset=o, value=b"") for o in range(first, last))
        service._drain(tp, 0.0)

    arrive(0, 5)  # caught up at 5: the tail chunk [0, 5) is processed at once
    arrive(5, 11)  # [5, 8) completes chunk 0; 8..10 wait (caught up again: [8, 11))
    assert chunks == [(0, 5), (5, 8), (8, 11)]
    service._rollback()  # outputs not acknowledged: back to the empty model, offsets forgotten
    service._resume_at, service.producer = 0.0, _Producer()
    chunks.clear()
    arrive(0, 16)  # the replay finds the whole backlog in the topic
    assert chunks == [(0, 5), (5, 8), (8, 11), (11, 16)]
    assert service._checkpoint(force=True)  # a durable window: its cuts are no longer needed
    service.next_offsets.clear()
    chunks.clear()
    arrive(0, 16)
    assert chunks == [(0, 8), (8, 16)]


def test_past_end_needs_two_checks_in_a_row_then_starts_again() -> None:
    """A position past the high watermark once may be a watermark one fetch behind; twice in a
    row means the topic was re-created (or truncated).  One rule for the input and the reference."""
    from stream_influence.io.lag import PastEnd

    seen = PastEnd()
    assert not seen.check("t-0", 120, 100)
    assert not seen.check("t-0", 100, 100)  # caught up again: the count restarts
    assert not seen.check("t-0", 120, 100)
    assert seen.check("t-0", 120, 100)
    assert not seen.check("t-0", 120, 100)  # reset: counting starts again after a positive
    assert not seen.check("t-1", 5, 3)  # partitions are counted apart


def test_a_failing_metric_is_logged_loudly_once_and_an_unknown_one_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = AppSettings(checkpoint={"directory": str(tmp_path / "ck")}, metrics={"enabled": False})
    service = Service(cfg, install_signals=False)

    class Broken:
        calls = 0

        def set_broker_up(self, up: bool) -> None:
            Broken.calls += 1
            raise ValueError("label cardinality bug")

    service.metrics = Broken()
    with caplog.at_level(logging.DEBUG, logger="stream_influence.service.loop"):
        service._metric("set_broker_up", True)  # never stops the stream
        service._metric("set_broker_up", False)
    assert Broken.calls == 2
    failed = [r for r in caplog.records if "metrics.set_broker_up failed" in r.getMessage()]
    assert [r.levelno for r in failed] == [logging.WARNING, logging.DEBUG]
    assert failed[0].exc_info is not None and "label cardinality bug" in str(failed[0].exc_info[1])
    with pytest.raises(AttributeError):
        service._metric("observe_batchh")  # a typo is a bug, not a metrics outage
