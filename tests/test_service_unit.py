"""Service pieces that need no broker: checkpoint files, headers, client options, CLI wiring."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from stream_influence import kafka_io
from stream_influence.checkpoint import CheckpointStore
from stream_influence.cli import build_parser
from stream_influence.config import AppSettings, KafkaSettings
from stream_influence.engine import InfluenceEngine
from stream_influence.errors import CheckpointError, OutputError
from stream_influence.settings import EngineSettings
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
    opts = kafka_io.common_options(k)
    assert opts["bootstrap_servers"] == ["a:9092", "b:9093"]
    assert (opts["security_protocol"], opts["sasl_mechanism"]) == ("SASL_SSL", "PLAIN")
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("u", "p")
    assert opts["ssl_cafile"] == "/etc/ca.pem"
    passed = kafka_io._with_passthrough({}, k, {"metadata_max_age_ms": None})
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
    from stream_influence.service import Service

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
