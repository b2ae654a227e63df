"""Secrets never shown, security settings validated and passed to kafka-python unchanged,
NaN/Inf and cross-field mistakes caught by `config check`, kafka-python's log noise bounded."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

import stream_influence.io.kafka_python as kafka_io
from stream_influence.cli import main
from stream_influence.config import AppSettings, KafkaSettings, LoggingSettings, is_secret_name, load_config
from stream_influence.core.settings import EngineSettings, PolicySettings
from stream_influence.errors import BrokerUnreachableError, ConfigError
from stream_influence.observability.logs import RateLimitFilter, setup_logging
from stream_influence.tooling.embedded import free_port

SECRET = "s3cr3t-Passw0rd"
SASL = {
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_plain_username": "svc",
    "sasl_plain_password": SECRET,
}


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# -- secrets ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("ssl_password", True),
        ("sasl_plain_password", True),
        ("sasl.oauth.token", True),
        ("client_secret", True),
        ("api_key", True),
        ("API-KEY", True),
        ("ssl_passphrase", True),
        ("credentials", True),
        ("key_serializer", False),
        ("sasl_oauth_token_provider", False),  # an object that fetches tokens
        ("key_deserializer", False),
        ("ssl_keyfile", False),  # a path, not the key
        ("ssl_check_hostname", False),
        ("monkey_patch", False),  # "key" only as a whole word
        ("tokenizer_threads", False),
        ("max_partition_fetch_bytes", False),
    ],
)
def test_secret_name_rule(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_failing_kafka_section_does_not_print_passwords(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 4: a section-level error used to echo the whole section, password included."""
    cfg = _write(
        tmp_path / "c.yaml",
        {
            "kafka": {
                **SASL,
                "ssl_password": SECRET + "-key",
                "request_timeout_ms": 200_000,  # above the delivery timeout: a section-level error
                "client_options": {"sasl_oauth_token": SECRET + "-tok", "api_key": SECRET + "-api"},
            }
        },
    )
    assert main(["config", "check", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "kafka.request_timeout_ms" in err and "delivery_timeout_ms" in err
    assert main(["run", "--config", str(cfg)]) == 2
    run_err = capsys.readouterr().err
    assert "kafka.request_timeout_ms" in run_err
    assert SECRET not in err + run_err


def test_tracebacks_of_settings_errors_do_not_show_secrets() -> None:
    from pydantic import ValidationError

    for build in (
        lambda: KafkaSettings(**SASL, request_timeout_ms=200_000),
        lambda: AppSettings(kafka={**SASL, "request_timeout_ms": 200_000}),
        lambda: KafkaSettings(**SASL, client_options={"api_key": 1}),
    ):
        with pytest.raises(ValidationError) as info:
            build()
        assert SECRET not in str(info.value)


def test_invalid_secret_value_is_not_echoed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tmp_path / "c.yaml", {"kafka": {"client_options": {"ssl_password": 12345678}}})
    assert main(["config", "check", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "client_options" in err and "12345678" not in err


def test_config_show_masks_every_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(
        tmp_path / "c.yaml",
        {
            "kafka": {
                **SASL,
                "ssl_password": SECRET,
                "ssl_certfile": "c.pem",
                "ssl_keyfile": "k.pem",
                "client_options": {"ssl_password": SECRET, "api_key": SECRET, "key_serializer": None},
            }
        },
    )
    assert main(["config", "show", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    kafka = json.loads(out)["kafka"]
    assert kafka["sasl_plain_password"] == kafka["ssl_password"] == "**********"
    assert kafka["client_options"] == {
        "ssl_password": "**********",
        "api_key": "**********",
        "key_serializer": None,
    }
    # repr (what a log line or a traceback would show) masks them too.
    assert SECRET not in repr(load_config(cfg))


def test_real_secrets_reach_every_client_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The masked values are unwrapped only in the kwargs given to kafka-python's constructors."""
    built: dict[str, dict[str, Any]] = {}

    def fake(kind: str) -> Any:
        def construct(**kwargs: Any) -> str:
            built[kind] = kwargs
            return kind

        return construct

    for name in ("KafkaConsumer", "KafkaProducer", "KafkaAdminClient"):
        real = getattr(kafka_io, name)
        stub = type(
            name,
            (),
            {
                "DEFAULT_CONFIG": real.DEFAULT_CONFIG,
                "__new__": staticmethod(lambda cls, _n=name, **kw: fake(_n)(**kw)),
            },
        )
        monkeypatch.setattr(kafka_io, name, stub)
    k = KafkaSettings(
        bootstrap_servers="b1:9093, b2:9093",
        **SASL,
        ssl_cafile=Path("/etc/ca.pem"),
        ssl_certfile=Path("/etc/c.pem"),
        ssl_keyfile=Path("/etc/k.pem"),
        ssl_password=SECRET + "-key",
        ssl_check_hostname=False,
        client_options={"ssl_crlfile": "/etc/crl.pem", "sasl_kerberos_service_name": "kafka"},
    )
    kafka_io.build_consumer(k)
    kafka_io.build_producer(k)
    kafka_io.build_admin(k)
    assert set(built) == {"KafkaConsumer", "KafkaProducer", "KafkaAdminClient"}
    for kind, kwargs in built.items():
        expected = {
            "bootstrap_servers": ["b1:9093", "b2:9093"],
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "svc",
            "sasl_plain_password": SECRET,
            "ssl_cafile": "/etc/ca.pem",
            "ssl_certfile": "/etc/c.pem",
            "ssl_keyfile": "/etc/k.pem",
            "ssl_password": SECRET + "-key",
            "ssl_check_hostname": False,
            "ssl_crlfile": "/etc/crl.pem",
            "sasl_kerberos_service_name": "kafka",
        }
        assert {key: kwargs.get(key) for key in expected} == expected, kind
        assert all(type(v) is not type(k.sasl_plain_password) for v in kwargs.values()), kind


def test_secret_client_option_reaches_client_unwrapped() -> None:
    k = KafkaSettings(
        security_protocol="SSL",
        client_options={"ssl_password": SECRET, "key_deserializer": None, "max_partition_fetch_bytes": 1024},
    )
    opts = kafka_io.consumer_options(k)
    assert opts["ssl_password"] == SECRET and opts["max_partition_fetch_bytes"] == 1024
    assert "key_deserializer" in opts and opts["key_deserializer"] is None


def test_reconnect_backoff_reaches_every_client_and_client_options_still_win() -> None:
    """Resuming after an outage waits for the reconnect back-off: ours (1 s) must reach every
    client, not kafka-python's 30 s default; an explicit client option still overrides it."""
    k = KafkaSettings()
    for build in (kafka_io.consumer_options, kafka_io.producer_options, kafka_io.admin_options):
        assert build(k)["reconnect_backoff_max_ms"] == 1000, build.__name__
    k = KafkaSettings(client_options={"reconnect_backoff_max_ms": 250})
    assert kafka_io.consumer_options(k)["reconnect_backoff_max_ms"] == 250


# -- validation of the security settings ----------------------------------------------------------
def test_sasl_protocol_needs_mechanism_and_credentials() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_from({"kafka": {"security_protocol": "SASL_SSL"}})
    msg = str(info.value)
    for name in ("kafka.sasl_mechanism", "kafka.sasl_plain_username", "kafka.sasl_plain_password"):
        assert f"{name}: is required with security_protocol SASL_SSL" in msg
    with pytest.raises(ConfigError, match="sasl_mechanism"):
        load_config_from({"kafka": {**SASL, "sasl_mechanism": "GSSAPI"}})


def test_tls_files_only_with_a_tls_protocol_and_in_pairs() -> None:
    with pytest.raises(ConfigError, match=r"kafka\.ssl_cafile: is set but security_protocol is PLAINTEXT"):
        load_config_from({"kafka": {"ssl_cafile": "ca.pem"}})
    with pytest.raises(ConfigError, match=r"kafka\.ssl_keyfile: mutual TLS needs both"):
        load_config_from({"kafka": {"security_protocol": "SSL", "ssl_certfile": "c.pem"}})


def load_config_from(data: dict[str, Any]) -> AppSettings:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return load_config(_write(Path(d) / "c.yaml", data))


# -- config check catches what run would fail on (defect 7) -----------------------------------
def test_nan_and_inf_rejected_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Defect 7: `quarantine_threshold: .nan` used to pass and silently turn routing off."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "engine:\n  policy:\n    quarantine_threshold: .nan\n  curvature:\n    damping: .inf\n"
        "kafka:\n  flush_timeout_seconds: .inf\nshutdown_grace_seconds: .nan\n"
    )
    assert main(["config", "check", str(cfg)]) == 1
    err = capsys.readouterr().err
    for path in (
        "engine.policy.quarantine_threshold",
        "engine.curvature.damping",
        "kafka.flush_timeout_seconds",
        "shutdown_grace_seconds",
    ):
        assert f"{path}: Input should be a finite number" in err, path
    with pytest.raises(ValueError, match="finite"):
        PolicySettings(quarantine_threshold=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        EngineSettings(policy={"accept_threshold": float("-inf")})


def test_cross_field_mistakes_reported_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = _write(
            tmp_path / "c.yaml",
            {
                "kafka": {
                    "topic": "events",
                    "quarantine_topic": "events",
                    "dead_letter_topic": "",
                    "reference_topic": "bad name!",
                    "session_timeout_ms": 3000,
                    "heartbeat_interval_ms": 1000,
                },
                "checkpoint": {"directory": str(not_a_dir / "ck")},
                "metrics": {"port": port},
                "engine": {"policy": {"quantile": 3}},
            },
        )
        assert main(["config", "check", str(cfg)]) == 1
    err = capsys.readouterr().err
    expected = [
        "kafka.heartbeat_interval_ms: 1000 ms is not below session_timeout_ms / 3",
        "kafka.quarantine_topic: 'events' is also kafka.topic",
        "kafka.dead_letter_topic: '' is not a valid topic name",
        "kafka.reference_topic: 'bad name!' is not a valid topic name",
        f"checkpoint.directory: {not_a_dir} is not a directory",
        f"metrics.port: cannot bind 127.0.0.1:{port}: in use",
        "engine.policy.quantile",
    ]
    for line in expected:
        assert line in err, line
    assert "7 invalid setting(s)" in err and err.count("(hint: ") == 6


def test_environment_checks_also_stop_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    cfg = _write(tmp_path / "c.yaml", {"checkpoint": {"directory": str(not_a_dir / "ck")}})
    assert main(["run", "--config", str(cfg)]) == 2
    assert "checkpoint.directory" in capsys.readouterr().err


def test_tls_files_must_be_readable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    kafka = {"security_protocol": "SSL", "ssl_cafile": str(ca)}
    cfg = _write(tmp_path / "c.yaml", {"kafka": kafka, "metrics": {"port": 0}})
    assert main(["config", "check", str(cfg)]) == 0, capsys.readouterr().err
    kafka |= {
        "ssl_cafile": str(tmp_path / "missing.pem"),
        "ssl_certfile": str(tmp_path),
        "ssl_keyfile": str(ca),
    }
    _write(cfg, {"kafka": kafka, "metrics": {"port": 0}})
    assert main(["config", "check", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"kafka.ssl_cafile: {tmp_path / 'missing.pem'} is not a readable file" in err
    assert f"kafka.ssl_certfile: {tmp_path} is not a readable file" in err
    assert "kafka.ssl_keyfile" not in err


def test_creatable_checkpoint_directory_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(
        tmp_path / "c.yaml", {"checkpoint": {"directory": str(tmp_path / "a" / "b")}, "metrics": {"port": 0}}
    )
    assert main(["config", "check", str(cfg)]) == 0, capsys.readouterr().err
    assert not (tmp_path / "a").exists(), "check creates nothing"


# -- kafka-python's log noise --------------------------------------------------------------------
def test_rate_limit_filter_lets_a_few_through_then_a_summary() -> None:
    now = [0.0]
    f = RateLimitFilter(burst=3, window_s=60, clock=lambda: now[0])

    def rec(name: str, msg: str, *args: Any) -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)

    passed = [r for i in range(150) if f.filter(r := rec("kafka.net.manager", "Connection failed: %s", i))]
    assert len(passed) == 3
    assert "held back" in passed[-1].getMessage()
    assert f.filter(rec("kafka.conn", "other kind %s", 1))  # another kind has its own budget
    assert f.filter(rec("stream_influence.service.loop", "x")) and all(
        f.filter(rec("stream_influence.service.loop", "x")) for _ in range(10)
    )  # our own lines are never held back
    now[0] = 61.0
    nxt = rec("kafka.net.manager", "Connection failed: %s", 999)
    assert f.filter(nxt)
    assert nxt.getMessage().startswith("[147 similar line(s) held back in the last 60s]")


def test_debug_logs_of_kafka_python_mask_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    """kafka-python logs its whole configuration at DEBUG; the password must not get through."""
    k = KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{free_port()}",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_plain_username="svc",
        sasl_plain_password=SECRET,
        client_options={"ssl_password": SECRET + "-2"},
    )
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("kafka").level)
    try:
        setup_logging(LoggingSettings(level="DEBUG"), verbose=True, secrets=k.secret_values())
        logging.getLogger("kafka").setLevel(logging.DEBUG)
        with pytest.raises(BrokerUnreachableError):
            kafka_io.check_broker(k, timeout_s=1.0)
        try:
            raise RuntimeError(f"login failed for {SECRET}")
        except RuntimeError:
            logging.getLogger("kafka.test").exception("with a traceback")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        logging.getLogger("kafka").setLevel(saved[2])
    err = capsys.readouterr().err
    assert "Starting KafkaAdminClient with configuration" in err  # the line that used to leak
    assert "'sasl_plain_password': '**********'" in err
    assert "login failed for **********" in err
    assert SECRET not in err


def test_json_logs_mask_secrets_in_tracebacks_and_extra_fields(capsys: pytest.CaptureFixture[str]) -> None:
    """Review item 2: the JSON formatter used to re-format the traceback itself (ignoring the
    masked text) and to copy ``extra=`` fields unmasked."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging(LoggingSettings(json_format=True), secrets=[SECRET])
        log = logging.getLogger("stream_influence.test")
        try:
            raise RuntimeError(f"SASL authentication failed with password {SECRET}")
        except RuntimeError:
            log.exception("final checkpoint failed")
        log.warning("done", extra={"detail": f"token {SECRET}", "count": 3})
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 2
    assert "RuntimeError: SASL authentication failed with password **********" in lines[0]["exc_info"]
    assert lines[1]["detail"] == "token **********" and lines[1]["count"] == 3
    assert SECRET not in json.dumps(lines)


def test_a_config_file_that_is_not_utf8_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review item 8: a binary config file used to end in a UnicodeDecodeError traceback."""
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"kafka:\n  topic: \xff\xfe\x04\xd0\x8c\n")
    assert main(["config", "check", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(cfg) in err and "UTF-8" in err
    assert main(["run", "--config", str(cfg)]) == 2
    assert str(cfg) in capsys.readouterr().err


def test_a_checkpoint_directory_that_cannot_be_inspected_is_a_problem_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review item 8: a checkpoint directory under a directory the user cannot traverse (root
    cannot be denied by mode bits, so the denial is injected at ``stat``) used to end in a
    PermissionError traceback from ``Path.exists``."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_stat = Path.stat

    def stat(self: Path, *args: Any, **kwargs: Any) -> os.stat_result:
        if str(self).startswith(str(locked) + os.sep):
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    cfg = _write(
        tmp_path / "c.yaml", {"checkpoint": {"directory": str(locked / "ck")}, "metrics": {"port": 0}}
    )
    assert main(["config", "check", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint.directory: cannot inspect {locked / 'ck'}: Permission denied" in err
    assert main(["run", "--config", str(cfg)]) == 2
    assert "checkpoint.directory" in capsys.readouterr().err
