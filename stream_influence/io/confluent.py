"""The confluent-kafka (librdkafka) backend: option mapping and clients.

Optional: ``confluent_kafka`` is imported lazily, so the package works without the ``[confluent]``
extra, and selecting ``kafka.client: confluent`` without it is a :class:`ConfigError` that names
the extra.  Every :class:`~stream_influence.config.KafkaSettings` field means the same as with
kafka-python; here it is spelled with librdkafka's property names.  Secrets are unwrapped only in
the property dicts built here.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from pydantic import SecretStr

from stream_influence.config import TLS_PROTOCOLS, KafkaSettings
from stream_influence.errors import ConfigError

__all__ = [
    "admin_config",
    "client_module",
    "common_config",
    "consumer_config",
    "producer_config",
]

log = logging.getLogger(__name__)
# librdkafka's own log lines, delivered through Python logging (and so through the secret filter).
rdkafka_log = logging.getLogger("stream_influence.io.librdkafka")

EXTRA_HINT = "install the optional extra: pip install 'stream-influence[confluent]'"


def client_module() -> ModuleType:
    """``confluent_kafka``, or :class:`ConfigError` naming the extra that provides it."""
    try:
        import confluent_kafka
    except ImportError as exc:
        raise ConfigError(
            f"kafka.client is confluent but confluent-kafka is not installed ({exc}); {EXTRA_HINT}"
        ) from None
    return confluent_kafka


def common_config(k: KafkaSettings) -> dict[str, Any]:
    """Connection and security properties shared by consumers, producers and the admin client."""
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(k.bootstrap_list()),
        "client.id": k.client_id,
        "security.protocol": k.security_protocol.lower(),
        "reconnect.backoff.max.ms": k.reconnect_backoff_max_ms,
        "socket.timeout.ms": k.request_timeout_ms,
    }
    if k.sasl_mechanism:
        conf["sasl.mechanism"] = k.sasl_mechanism
    if k.sasl_plain_username is not None:
        conf["sasl.username"] = k.sasl_plain_username
    if k.sasl_plain_password is not None:
        conf["sasl.password"] = k.sasl_plain_password.get_secret_value()
    if k.security_protocol in TLS_PROTOCOLS:
        # "probe": the wheel's bundled OpenSSL does not know the system's trust store path.
        conf["ssl.ca.location"] = str(k.ssl_cafile) if k.ssl_cafile is not None else "probe"
        conf["ssl.endpoint.identification.algorithm"] = "https" if k.ssl_check_hostname else "none"
        if k.ssl_certfile is not None:
            conf["ssl.certificate.location"] = str(k.ssl_certfile)
        if k.ssl_keyfile is not None:
            conf["ssl.key.location"] = str(k.ssl_keyfile)
        if k.ssl_password is not None:
            conf["ssl.key.password"] = k.ssl_password.get_secret_value()
    return conf


def _with_passthrough(conf: dict[str, Any], k: KafkaSettings) -> dict[str, Any]:
    # Every client gets every option: librdkafka ignores (and logs) a property of the other kind.
    conf.update(
        {key: v.get_secret_value() if isinstance(v, SecretStr) else v for key, v in k.client_options.items()}
    )
    conf["logger"] = rdkafka_log
    return conf


def consumer_config(k: KafkaSettings, *, group: bool = True) -> dict[str, Any]:
    """Properties of the training-events consumer (in the group, manual commits) or of a
    group-less reader (librdkafka requires a ``group.id`` even then; it never joins or commits)."""
    conf = common_config(k)
    conf.update(
        {
            "group.id": k.group_id if group else f"{k.group_id}.reader",
            "enable.auto.commit": False,
            # Positions move only through what the service hands back; nothing is stored behind it.
            "enable.auto.offset.store": False,
            "auto.offset.reset": k.auto_offset_reset,
            "session.timeout.ms": k.session_timeout_ms,
            "heartbeat.interval.ms": k.heartbeat_interval_ms,
            "max.poll.interval.ms": k.max_poll_interval_ms,
        }
    )
    return _with_passthrough(conf, k)


_ACKS = {0: "0", 1: "1", "all": "all"}


def producer_config(k: KafkaSettings) -> dict[str, Any]:
    """Properties of the output producer."""
    conf = common_config(k)
    conf.update(
        {
            "acks": _ACKS[k.producer_acks],
            "linger.ms": k.producer_linger_ms,
            "batch.size": k.producer_batch_bytes,
            "enable.idempotence": k.producer_idempotence,
            "compression.type": k.producer_compression or "none",
            "request.timeout.ms": k.request_timeout_ms,
        }
    )
    return _with_passthrough(conf, k)


def admin_config(k: KafkaSettings) -> dict[str, Any]:
    """Properties of the admin client."""
    return _with_passthrough(common_config(k), k)
