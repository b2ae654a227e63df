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
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
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

    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "training-events"
    group_id: str = "stream-influence"
    reference_topic: str | None = Field(
        default=None, description="Trusted events, read by every instance outside the group."
    )
    quarantine_topic: str = "training-events.quarantine"
    dead_letter_topic: str = "training-events.dead-letter"
    accepted_topic: str | None = Field(default=None, description="Optional copy of accepted events.")
    decisions_topic: str | None = Field(default=None, description="Optional audit of every decision.")
    max_poll_records: int = Field(default=512, ge=1, description="Poll batch size.")
    poll_timeout_ms: int = Field(default=500, ge=1)
    session_timeout_ms: int = Field(default=45_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    client_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra kafka-python options passed through verbatim."
    )


class CheckpointSettings(_Frozen):
    """Durable engine state with the input offsets it includes."""

    directory: Path = Path("checkpoints")
    every_events: int = Field(default=10_000, ge=1)
    every_seconds: float = Field(default=30.0, gt=0)


class MetricsSettings(_Frozen):
    """Prometheus endpoint (and /healthz, /readyz) of the service."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9400, ge=0, le=65535)


class LoggingSettings(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=False, alias="json")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class AppSettings(BaseSettings):
    """Everything ``stream-influence run`` is configured with."""

    engine: EngineSettings = Field(default_factory=EngineSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    shutdown_grace_seconds: float = Field(default=30.0, gt=0)

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
