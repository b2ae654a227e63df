"""The confluent-kafka backend's option mapping: every KafkaSettings field reaches librdkafka under
its librdkafka name, secrets are unwrapped only there, and what cannot work is refused up front."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from stream_influence.config import KafkaSettings, format_validation_error
from stream_influence.errors import ConfigError
from stream_influence.io import confluent as ck

SECRET = "s3cr3t-value"


def test_tls_and_sasl_settings_map_to_librdkafka_names() -> None:
    k = KafkaSettings(
        client="confluent",
        bootstrap_servers="a:9093, b:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username="svc",
        sasl_plain_password=SECRET,
        ssl_cafile=Path("/etc/ca.pem"),
        ssl_certfile=Path("/etc/client.pem"),
        ssl_keyfile=Path("/etc/client.key"),
        ssl_password=SECRET + "-key",
        ssl_check_hostname=False,
    )
    conf = ck.common_config(k)
    assert conf["bootstrap.servers"] == "a:9093,b:9093"
    assert conf["security.protocol"] == "sasl_ssl"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "svc"
    assert conf["sasl.password"] == SECRET
    assert conf["ssl.ca.location"] == "/etc/ca.pem"
    assert conf["ssl.certificate.location"] == "/etc/client.pem"
    assert conf["ssl.key.location"] == "/etc/client.key"
    assert conf["ssl.key.password"] == SECRET + "-key"
    assert conf["ssl.endpoint.identification.algorithm"] == "none"
    # …and librdkafka knows every one of these names (it refuses unknown ones at construction with
    # "No such configuration property"; the files here do not exist, which fails differently).
    confluent_kafka = pytest.importorskip("confluent_kafka")
    for name, value in conf.items():
        try:
            confluent_kafka.Producer({"bootstrap.servers": "x:1", "security.protocol": "ssl", name: value})
        except confluent_kafka.KafkaException as exc:
            assert "No such configuration property" not in str(exc), name


def test_plaintext_sets_no_tls_property_and_checks_hostnames_by_default() -> None:
    plain = ck.common_config(KafkaSettings(client="confluent"))
    assert plain["security.protocol"] == "plaintext"
    assert not [name for name in plain if name.startswith(("ssl.", "sasl."))]
    tls = ck.common_config(KafkaSettings(client="confluent", security_protocol="SSL"))
    assert tls["ssl.endpoint.identification.algorithm"] == "https"
    assert tls["ssl.ca.location"] == "probe"  # the system's trust store, wherever it is


def test_consumer_and_producer_settings_and_passthrough() -> None:
    k = KafkaSettings(
        client="confluent",
        group_id="g1",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        auto_offset_reset="latest",
        producer_acks=1,
        producer_linger_ms=7,
        producer_compression="zstd",
        client_options={"fetch.max.bytes": 1234, "sasl.oauthbearer.client.secret": SECRET},
    )
    c = ck.consumer_config(k)
    assert c["group.id"] == "g1" and c["enable.auto.commit"] is False
    assert c["session.timeout.ms"] == 6000 and c["heartbeat.interval.ms"] == 1000
    assert c["auto.offset.reset"] == "latest"
    assert c["fetch.max.bytes"] == 1234
    assert c["sasl.oauthbearer.client.secret"] == SECRET  # unwrapped only here
    assert ck.consumer_config(k, group=False)["group.id"] != "g1"  # a reader never joins the group
    p = ck.producer_config(k)
    assert (p["acks"], p["linger.ms"], p["compression.type"]) == ("1", 7, "zstd")
    assert p["fetch.max.bytes"] == 1234
    assert ck.producer_config(KafkaSettings(client="confluent"))["compression.type"] == "none"


def test_kafka_python_option_names_are_refused_with_the_librdkafka_spelling() -> None:
    with pytest.raises(ValidationError) as err:
        KafkaSettings(client="confluent", client_options={"fetch_max_bytes": 1})
    text = format_validation_error(err.value, source="test")
    assert "client_options.fetch_max_bytes: is a kafka-python option name" in text
    assert "'fetch.max.bytes'" in text
    # The same name is fine for the client it belongs to.
    assert KafkaSettings(client_options={"fetch_max_bytes": 1}).client == "kafka-python"


@pytest.mark.parametrize(
    ("name", "value"),
    [("partition.assignment.strategy", "cooperative-sticky"), ("group.protocol", "consumer")],
)
def test_incremental_rebalancing_is_refused(name: str, value: str) -> None:
    with pytest.raises(ValidationError) as err:
        KafkaSettings(client="confluent", client_options={name: value})
    assert f"client_options.{name}: {value!r} is not supported" in format_validation_error(
        err.value, source="t"
    )
    assert KafkaSettings(client="confluent", client_options={name: "range"}).client_options[name] == "range"


def test_missing_extra_is_a_config_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"stream-influence\[confluent\]"):
        ck.client_module()


def test_a_property_librdkafka_refuses_is_a_config_error() -> None:
    pytest.importorskip("confluent_kafka")
    from stream_influence.io.broker import open_broker

    backend = open_broker(KafkaSettings(client="confluent", client_options={"no.such.property": 1}))
    with pytest.raises(ConfigError, match=r"librdkafka refuses the configuration: .*no\.such\.property"):
        backend.producer()


def test_the_debug_switch_sends_librdkafka_debug_lines_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    k = KafkaSettings(client="confluent")
    assert "debug" not in ck.consumer_config(k) and "logger" in ck.consumer_config(k)
    monkeypatch.setenv(ck.RDKAFKA_DEBUG_ENV, "consumer,cgrp,fetch")
    c = ck.consumer_config(k)
    # librdkafka writes them itself: Python logging's level and rate limit would hide them.
    assert c["debug"] == "consumer,cgrp,fetch" and "logger" not in c
    assert "debug" not in ck.producer_config(k)  # consumers only
