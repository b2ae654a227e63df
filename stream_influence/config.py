"""Service configuration: one YAML file plus ``STREAM_INFLUENCE_…`` environment overrides.

Nested fields use ``__`` in environment names, e.g.
``STREAM_INFLUENCE_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or
``STREAM_INFLUENCE_ENGINE__POLICY__QUARANTINE_THRESHOLD=0.05``.  Environment values win over
the file, the file over the defaults.

>>> cfg = AppSettings()
>>> cfg.kafka.topic, cfg.metrics.host
('training-events', '127.0.0.1')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError
from .settings import EngineSettings

__all__ = [
    "AppSettings",
    "CheckpointSettings",
    "KafkaSettings",
    "LoggingSettings",
    "MetricsSettings",
    "load_config",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Frozen):
    """Where events come from and where decisions go (kafka-python client options)."""

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Comma-separated host:port list of brokers to bootstrap from."
    )
    topic: str = Field(default="training-events", description="Topic of the training events.")
    group_id: str = Field(
        default="stream-influence",
        description="Consumer group; instances of one group split the topic's partitions.",
    )
    reference_topic: str | None = Field(
        default=None, description="Trusted events, read by every instance outside the group."
    )
    quarantine_topic: str = Field(
        default="training-events.quarantine",
        description="Quarantined events: original bytes, key = event id, scores and source offsets in headers.",
    )
    dead_letter_topic: str = Field(
        default="training-events.dead-letter",
        description="Invalid events: original key, value and headers plus reason, detail and source offsets.",
    )
    accepted_topic: str | None = Field(default=None, description="Optional copy of accepted events.")
    decisions_topic: str | None = Field(default=None, description="Optional audit of every decision.")
    max_poll_records: int = Field(default=512, ge=1, description="Poll batch size.")
    poll_timeout_ms: int = Field(default=500, ge=1, description="Longest wait of one poll for records.")
    session_timeout_ms: int = Field(
        default=45_000,
        ge=1000,
        description="Group session timeout: a silent member is evicted after it (joins take about half).",
    )
    heartbeat_interval_ms: int = Field(
        default=3_000, ge=100, description="Heartbeat interval (well below session_timeout_ms)."
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        default="earliest",
        description="Where to start a partition that neither a checkpoint nor a commit knows.",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="Passed to every Kafka client."
    )
    sasl_mechanism: str | None = Field(
        default=None, description="SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, …)."
    )
    sasl_plain_username: str | None = Field(default=None, description="SASL user name.")
    sasl_plain_password: SecretStr | None = Field(
        default=None, description="SASL password (masked in `config show`)."
    )
    ssl_cafile: Path | None = Field(
        default=None, description="CA bundle that signs the brokers' certificates."
    )
    ssl_certfile: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    ssl_keyfile: Path | None = Field(default=None, description="Client private key (mutual TLS).")
    client_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra kafka-python options passed through verbatim."
    )
    client_id: str = Field(default="stream-influence", description="Client id shown in broker logs.")
    max_poll_interval_ms: int = Field(
        default=300_000, ge=1000, description="Longest pause between polls before the group evicts us."
    )
    request_timeout_ms: int = Field(
        default=30_000, ge=1000, description="Timeout of one broker request (consumer, producer, admin)."
    )
    process_batch_size: int = Field(
        default=512,
        ge=1,
        description="Events per engine batch.  Batches are aligned to input offsets "
        "(offset // process_batch_size per partition) so that a replay after a crash cuts the "
        "same batches as the original run; a partial batch is processed once the partition is "
        "caught up with its high watermark.",
    )
    producer_acks: Literal[0, 1, "all"] = Field(
        default="all", description="Acknowledgements the output producer waits for."
    )
    producer_linger_ms: int = Field(default=5, ge=0, description="Output producer batching delay.")
    producer_batch_bytes: int = Field(
        default=262_144, ge=1024, description="Output producer batch size per partition, in bytes."
    )
    producer_compression: Literal["gzip", "snappy", "lz4", "zstd"] | None = Field(
        default=None, description="Compression of output batches (None: uncompressed)."
    )
    producer_idempotence: bool = Field(
        default=False,
        description="Idempotent output producer.  Off by default: outputs are at-least-once "
        "anyway (keyed by event id), and the service re-creates its producer after a failed flush.",
    )
    producer_max_block_ms: int = Field(
        default=10_000,
        ge=0,
        description="Longest time producing one output may block (buffer full, broker unknown); "
        "beyond it the un-checkpointed window is rolled back and replayed.",
    )
    flush_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long a checkpoint waits for outputs to be acknowledged; on timeout the "
        "un-checkpointed window is rolled back and replayed.",
    )
    max_window_replays: int = Field(
        default=10,
        ge=0,
        description="How many times in a row the same un-checkpointed window may be rolled back and "
        "replayed (its outputs not acknowledged) before the service stops with an error naming the "
        "topic, partition and offset, instead of looping for ever.",
    )
    replay_backoff_seconds: float = Field(
        default=1.0,
        ge=0,
        description="Pause before the first replay of a rolled-back window; doubled for every further "
        "replay of the same window, up to replay_backoff_max_seconds.",
    )
    replay_backoff_max_seconds: float = Field(
        default=30.0, ge=0, description="Longest pause between two replays of the same window."
    )
    reference_backlog_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="At start, how long to read the reference topic's backlog before consuming.",
    )
    create_output_topics: bool = Field(
        default=True,
        description="Create missing output topics (quarantine, dead-letter, accepted, decisions) at start.",
    )

    @model_validator(mode="after")
    def _producer_timeouts(self) -> KafkaSettings:
        # kafka-python refuses such a producer at run time; say so when the file is checked.
        delivery = int(self.client_options.get("delivery_timeout_ms", 120_000))
        if delivery <= self.producer_linger_ms + self.request_timeout_ms:
            raise ValueError(
                f"producer_linger_ms ({self.producer_linger_ms}) + request_timeout_ms "
                f"({self.request_timeout_ms}) must stay below the producer's delivery_timeout_ms "
                f"({delivery}; set it under client_options to raise it)"
            )
        return self


class CheckpointSettings(_Frozen):
    """Durable engine state with the input offsets it includes."""

    directory: Path = Field(
        default=Path("checkpoints"),
        description="Checkpoint files of this instance (one directory per instance).",
    )
    every_events: int = Field(
        default=10_000,
        ge=1,
        description="Checkpoint (flush → write → commit) after this many events; bounds the replay window.",
    )
    every_seconds: float = Field(
        default=30.0, gt=0, description="…or after this many seconds, whichever comes first."
    )
    keep: int = Field(
        default=2, ge=1, description="Checkpoint files kept (the latest and, by default, one previous)."
    )


class MetricsSettings(_Frozen):
    """Prometheus endpoint (and /healthz, /readyz) of the service."""

    enabled: bool = Field(default=True, description="Serve /metrics, /healthz and /readyz.")
    host: str = Field(
        default="127.0.0.1",
        description="Bind address (loopback by default; 0.0.0.0 exposes it to the network).",
    )
    port: int = Field(default=9400, ge=0, le=65535, description="Port (0: any free port).")


class LoggingSettings(_Frozen):
    """Log level and format (plain text or one JSON object per line)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO",
        description="DEBUG: counts per batch; INFO: decision summaries; WARNING: rejects and outages.",
    )
    json_format: bool = Field(default=False, alias="json", description="One JSON object per line.")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class AppSettings(BaseSettings):
    """Everything ``stream-influence run`` is configured with."""

    engine: EngineSettings = Field(default_factory=EngineSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    shutdown_grace_seconds: float = Field(
        default=30.0,
        gt=0,
        description="On SIGTERM/SIGINT: time to finish the batch, flush, checkpoint, commit and leave "
        "the group before the process exits with status 1.",
    )

    model_config = SettingsConfigDict(
        env_prefix="STREAM_INFLUENCE_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first: it overrides what the YAML file (passed as init kwargs) says.
        return env_settings, init_settings


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: Path | None = None) -> AppSettings:
    """The effective configuration: defaults ← YAML file ← environment."""
    data = read_yaml(path) if path is not None else {}
    try:
        return AppSettings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=str(path or "environment"))) from exc


def format_validation_error(exc: ValidationError, source: str) -> str:
    """Every error on its own line, with its dotted path and pydantic's reason."""
    lines = [f"{source}: {exc.error_count()} invalid setting(s):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _walk(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """``(dotted name, field info, default, description)`` for every leaf setting."""
    rows: list[tuple[str, Any, Any, str]] = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.append((f"{prefix}{key}", info, None, ((ann.__doc__ or "").strip().splitlines() or [""])[0]))
            rows.extend(_walk(ann, f"{prefix}{key}."))
            continue
        default = info.get_default(call_default_factory=True)
        rows.append((f"{prefix}{key}", info, default, info.description or ""))
    return rows


def _yaml_value(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, SecretStr):
        value = "**********"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def example_yaml() -> str:
    """A commented YAML file with every setting at its default (deploy/config.example.yaml)."""
    lines = [
        "# stream-influence configuration: every setting, at its default.",
        "# Generated by `stream-influence config example`; override any value with an environment",
        "# variable STREAM_INFLUENCE_<SECTION>__<FIELD>, e.g. STREAM_INFLUENCE_KAFKA__TOPIC=events.",
        "# The engine.policy section is hot-reloaded on SIGHUP and when this file changes.",
        "",
    ]
    for dotted, info, default, desc in _walk(AppSettings):
        depth = dotted.count(".")
        indent = "  " * depth
        key = dotted.rsplit(".", 1)[-1]
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if depth == 0:
                lines.append("")
            lines.append(f"{indent}# {desc}" if desc else f"{indent}#")
            lines.append(f"{indent}{key}:")
            continue
        for part in _wrap(desc, 96 - len(indent)):
            lines.append(f"{indent}# {part}")
        lines.append(f"{indent}{key}: {_yaml_value(default)}")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def reference_markdown() -> str:
    """The configuration reference table (docs/configuration.md)."""
    out = [
        "# Configuration reference",
        "",
        "Generated by `stream-influence config reference` from the settings models; every field,",
        "its default and what it does. One YAML file (see `deploy/config.example.yaml`) plus",
        "environment overrides `STREAM_INFLUENCE_<SECTION>__<FIELD>` (nested with `__`).",
        "`stream-influence config show` prints the effective configuration (secrets masked);",
        "`stream-influence config check FILE` validates a file and lists every error with its path.",
        "",
        "| setting | default | description |",
        "| --- | --- | --- |",
    ]
    for dotted, info, default, desc in _walk(AppSettings):
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.append(f"| **`{dotted}`** | | {desc} |")
        else:
            out.append(f"| `{dotted}` | `{_yaml_value(default)}` | {desc.replace('|', '/')} |")
    return "\n".join(out) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) if text else []
