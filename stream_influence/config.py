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

import errno
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from stream_influence.core.settings import EngineSettings
from stream_influence.errors import ConfigError

__all__ = [
    "AppSettings",
    "CheckpointSettings",
    "ConfigProblem",
    "KafkaSettings",
    "LoggingSettings",
    "MetricsSettings",
    "ScaleOutSettings",
    "check_environment",
    "is_secret_name",
    "load_config",
    "redact",
]

MASK = "**********"  # what pydantic prints for a SecretStr

# A setting whose name contains one of these words holds a secret.  Names are split into words on
# anything but letters and digits, so ``ssl_password`` and ``api-key`` are secrets while
# ``key_serializer`` (a key *of a record*), ``ssl_keyfile`` (a path) and
# ``sasl_oauth_token_provider`` (an object that fetches tokens) are not.
_SECRET_WORDS = frozenset(
    {"password", "passwd", "passphrase", "secret", "token", "credential", "credentials", "key", "apikey"}
)
_NOT_SECRET_WORDS = frozenset({"serializer", "deserializer", "provider"})

SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})
TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")  # what Apache Kafka accepts as a topic name


def is_secret_name(name: str) -> bool:
    """True for a setting name that says it holds a secret (password, secret, token, key…).

    >>> [is_secret_name(n) for n in ("ssl_password", "sasl.oauth.token", "api_key", "key_serializer")]
    [True, True, True, False]
    """
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    return bool(words & _SECRET_WORDS) and not words & _NOT_SECRET_WORDS


def redact(value: Any, name: str = "") -> Any:
    """``value`` with every secret replaced by the mask: SecretStr values and values under secret names."""
    if isinstance(value, SecretStr) or (name and is_secret_name(name) and value is not None):
        return MASK
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value


@dataclass(frozen=True)
class ConfigProblem:
    """One mistake found by a cross-field or environment check: where, what, and how to fix it."""

    path: str
    message: str
    hint: str

    def line(self) -> str:
        return f"{self.path}: {self.message} (hint: {self.hint})"


def _raise_problems(problems: list[ConfigProblem]) -> None:
    # One error carrying every problem, so `config check` lists them all with their own paths.
    if problems:
        raise PydanticCustomError(
            "cross_field",
            "{count} inconsistent setting(s)",
            {"count": len(problems), "problems": problems},
        )


class _Frozen(BaseModel):
    # allow_inf_nan=False: a NaN threshold compares False with everything (routing silently off).
    # hide_input_in_errors: a traceback of a section's error would print the section, secrets and all.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, hide_input_in_errors=True)


class KafkaSettings(_Frozen):
    """Where events come from and where decisions go (the same options for either Kafka client)."""

    client: Literal["kafka-python", "confluent"] = Field(
        default="kafka-python",
        description="Kafka client library of the service: kafka-python (pure Python, always "
        "installed) or confluent (confluent-kafka on librdkafka: several times faster to consume and "
        "produce; needs the package's [confluent] extra).  Every setting here means the same on both; "
        "client_options are the chosen client's own option names (kafka-python: fetch_max_bytes, "
        "confluent: fetch.max.bytes).",
    )
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
    fetch_max_wait_ms: int = Field(
        default=20,
        ge=0,
        description="Longest time the broker may hold a fetch request that has no new records "
        "(kafka-python fetch_max_wait_ms, librdkafka fetch.wait.max.ms; both default to 500).  "
        "Short, because a chunk's last records wait for the next fetch when the partition has "
        "more: Apache Kafka answers a waiting fetch as soon as records arrive, but the embedded "
        "test broker held it even while records arrived (produce → poll p50 129 ms at 500, 9 ms "
        "at 20; docs/benchmarks.md, service_stages).  The cost: an idle consumer fetches this "
        "often (1.8 % of a core at 20, 0.1 % at 500, same run).",
    )
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
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None,
        description="SASL mechanism; required with security_protocol SASL_PLAINTEXT or SASL_SSL.",
    )
    sasl_plain_username: str | None = Field(
        default=None, description="SASL user name (PLAIN and SCRAM mechanisms)."
    )
    sasl_plain_password: SecretStr | None = Field(
        default=None, description="SASL password (a secret: masked in every output)."
    )
    ssl_cafile: Path | None = Field(
        default=None,
        description="CA bundle that signs the brokers' certificates (None: the system's trust store).",
    )
    ssl_certfile: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    ssl_keyfile: Path | None = Field(default=None, description="Client private key (mutual TLS).")
    ssl_password: SecretStr | None = Field(
        default=None, description="Password of ssl_keyfile (a secret: masked in every output)."
    )
    ssl_check_hostname: bool = Field(
        default=True,
        description="Check that a broker's certificate names the host connected to (keep on outside tests).",
    )
    client_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra options of the chosen client passed through verbatim (kafka-python keyword "
        "names with client kafka-python, librdkafka property names with client confluent).  String values whose name "
        "says password, passwd, passphrase, secret, token, credential(s) or key (as a word, so not "
        "key_serializer) are secrets (they must be strings): masked in every output, passed to the "
        "client unchanged.",
    )
    startup_timeout_seconds: float = Field(
        default=15.0,
        gt=0,
        description="At start, how long to try the bootstrap servers before exiting with one line "
        "that names them and the cause.",
    )
    client_id: str = Field(default="stream-influence", description="Client id shown in broker logs.")
    max_poll_interval_ms: int = Field(
        default=300_000, ge=1000, description="Longest pause between polls before the group evicts us."
    )
    request_timeout_ms: int = Field(
        default=30_000, ge=1000, description="Timeout of one broker request (consumer, producer, admin)."
    )
    reconnect_backoff_max_ms: int = Field(
        default=1000,
        ge=50,
        description="Longest back-off between reconnection attempts to a broker (Apache Kafka's Java "
        "client default; kafka-python's own 30 s would leave the service idle up to 30 s after the "
        "broker is back).",
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

    @field_validator("client_options", mode="after")
    @classmethod
    def _secret_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in options.items():
            if is_secret_name(name) and value is not None and not isinstance(value, SecretStr):
                if not isinstance(value, str):
                    raise ValueError(f"client_options.{name} looks like a secret and must be a string")
                value = SecretStr(value)
            out[name] = value
        return out

    def secret_values(self) -> list[str]:
        """The real values of every secret here (for the log filter that masks them)."""
        secrets = [self.sasl_plain_password, self.ssl_password, *self.client_options.values()]
        return [s.get_secret_value() for s in secrets if isinstance(s, SecretStr)]

    def bootstrap_list(self) -> list[str]:
        """The ``host:port`` entries of :attr:`bootstrap_servers`."""
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

    def topics(self) -> dict[str, str]:
        """Every configured topic by the name of its setting (unset optional topics left out)."""
        names = ("topic", "reference_topic", "quarantine_topic", "dead_letter_topic")
        names += ("accepted_topic", "decisions_topic")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSettings:
        problems: list[ConfigProblem] = []
        add = lambda path, msg, hint: problems.append(ConfigProblem(path, msg, hint))  # noqa: E731
        # kafka-python refuses such a producer at run time; say so when the file is checked.
        delivery = int(self.client_options.get("delivery_timeout_ms", 120_000))
        if self.client == "kafka-python" and delivery <= self.producer_linger_ms + self.request_timeout_ms:
            add(
                "request_timeout_ms",
                f"producer_linger_ms ({self.producer_linger_ms}) + request_timeout_ms "
                f"({self.request_timeout_ms}) must stay below the producer's delivery_timeout_ms "
                f"({delivery})",
                "lower request_timeout_ms or set client_options.delivery_timeout_ms higher",
            )
        if 3 * self.heartbeat_interval_ms >= self.session_timeout_ms:
            add(
                "heartbeat_interval_ms",
                f"{self.heartbeat_interval_ms} ms is not below session_timeout_ms / 3 "
                f"({self.session_timeout_ms / 3:.0f} ms): one late heartbeat would evict the member",
                f"set it to at most {max(1, (self.session_timeout_ms - 1) // 3)} or raise session_timeout_ms",
            )
        if not self.bootstrap_list():
            add("bootstrap_servers", "is empty", "give at least one host:port")
        if not self.group_id.strip():
            add("group_id", "is empty", "name the consumer group, e.g. stream-influence")
        seen: dict[str, str] = {}
        for field, name in self.topics().items():
            if not _TOPIC_NAME.fullmatch(name):
                add(
                    field,
                    f"{name!r} is not a valid topic name",
                    "use 1-249 characters from letters, digits, '.', '_' and '-'",
                )
            elif name in seen:
                add(
                    field,
                    f"{name!r} is also kafka.{seen[name]}",
                    "inputs and outputs need distinct topics, or events would be read back or mixed",
                )
            seen.setdefault(name, field)
        problems.extend(self._security_problems())
        problems.extend(self._client_option_problems())
        _raise_problems(problems)
        return self

    def _client_option_problems(self) -> list[ConfigProblem]:
        # librdkafka names are dotted; an underscore name is a kafka-python option that librdkafka
        # would refuse at start, so name the likely librdkafka spelling when the file is checked.
        if self.client != "confluent":
            return []
        problems = [
            ConfigProblem(
                f"client_options.{name}",
                "is a kafka-python option name, but client is confluent (librdkafka)",
                f"use the librdkafka property name, e.g. {name.replace('_', '.')!r}",
            )
            for name in self.client_options
            if "_" in name and "." not in name
        ]
        # The backend takes each assignment over whole (eager rebalancing), so the loop can
        # hand revoked partitions over; incremental protocols would bypass that.
        for name, bad in (("partition.assignment.strategy", "cooperative"), ("group.protocol", "consumer")):
            value = str(self.client_options.get(name, ""))
            if bad in value.lower():
                problems.append(
                    ConfigProblem(
                        f"client_options.{name}",
                        f"{value!r} is not supported by the confluent backend (eager rebalancing only)",
                        "leave it unset (range,roundrobin / the classic group protocol)",
                    )
                )
        return problems

    def _security_problems(self) -> list[ConfigProblem]:
        problems: list[ConfigProblem] = []
        proto = self.security_protocol
        sasl_set = [
            n for n in ("sasl_mechanism", "sasl_plain_username", "sasl_plain_password") if getattr(self, n)
        ]
        if proto in SASL_PROTOCOLS:
            for name in ("sasl_mechanism", "sasl_plain_username", "sasl_plain_password"):
                if not getattr(self, name):
                    problems.append(
                        ConfigProblem(
                            name,
                            f"is required with security_protocol {proto}",
                            "set it, or "
                            "use security_protocol SSL / PLAINTEXT for a broker without authentication",
                        )
                    )
        elif sasl_set:
            problems.append(
                ConfigProblem(
                    sasl_set[0],
                    f"is set but security_protocol is {proto}, so it would be ignored",
                    "use security_protocol SASL_SSL (or SASL_PLAINTEXT)",
                )
            )
        ssl_set = [
            n for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password") if getattr(self, n)
        ]
        if proto not in TLS_PROTOCOLS and ssl_set:
            problems.append(
                ConfigProblem(
                    ssl_set[0],
                    f"is set but security_protocol is {proto}, so it would be ignored",
                    "use security_protocol SSL (or SASL_SSL)",
                )
            )
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            problems.append(
                ConfigProblem(
                    "ssl_keyfile" if self.ssl_keyfile is None else "ssl_certfile",
                    "mutual TLS needs both ssl_certfile and ssl_keyfile",
                    "set both, or neither",
                )
            )
        return problems


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
        default=0.05,
        gt=0,
        description="…or after this many seconds, whichever comes first.  Offsets are committed "
        "only with a checkpoint, so this bounds the poll → commit latency: the state is captured "
        "on the loop thread and written on a writer thread, one checkpoint at a time, so the "
        "cadence is this or the time one write takes, whichever is longer.",
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

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, hide_input_in_errors=True)


class ScaleOutSettings(_Frozen):
    """Score workers and the one updater (``run --role score|update``; docs/architecture.md)."""

    updates_topic: str = Field(
        default="training-events.updates",
        description="Internal topic: every valid event with the decision, scores and snapshot version "
        "a score worker gave it, keyed by its source partition; the updater learns from it.",
    )
    model_topic: str = Field(
        default="training-events.model",
        description="Compacted topic of versioned model snapshots and updater leases (one partition).",
    )
    updater_group_id: str = Field(
        default="stream-influence.updater",
        description="Consumer group of the updater on updates_topic (a group of one).",
    )
    updates_partitions: int = Field(
        default=6, ge=1, description="Partitions of updates_topic when the updater creates it."
    )
    snapshot_every_seconds: float = Field(
        default=1.0,
        ge=0,
        description="The updater publishes its newest checkpoint as a snapshot at most this often "
        "(0: every checkpoint).  Checkpoints come every checkpoint.every_seconds (50 ms by default) "
        "and a snapshot is a few hundred KiB, so publishing each would flood the model topic; the "
        "final checkpoint at shutdown is always published.",
    )
    max_model_lag_versions: int = Field(
        default=3,
        ge=1,
        description="Staleness bound of a score worker: once it has scored max_model_lag_versions × "
        "checkpoint.every_events events on one snapshot, or sent that many to the updates topic that "
        "the snapshot in use has not learned yet (its per-source-partition high-water marks), it takes "
        "no new chunk until a newer snapshot arrives.",
    )


class AppSettings(BaseSettings):
    """Everything ``stream-influence run`` is configured with."""

    engine: EngineSettings = Field(default_factory=EngineSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    scaleout: ScaleOutSettings = Field(default_factory=ScaleOutSettings)
    shutdown_grace_seconds: float = Field(
        default=30.0,
        gt=0,
        description="On SIGTERM/SIGINT: time to finish the batch, flush, checkpoint, commit and leave "
        "the group before the process exits with status 1.",
    )
    blas_threads: int = Field(
        default=1,
        ge=0,
        description="Threads of the BLAS libraries (OpenBLAS, MKL) in the process, set when the service "
        "(every role) or an offline command (replay, score, requeue, demo) starts (0: leave the "
        "libraries' default, one per core).  The engine's products are "
        "small (a 512-event batch against a 65 × 10 head), so more threads only add hand-offs and "
        "spinning: with two threads on a 2-core machine the engine spent 5-7× the CPU per event "
        "(docs/benchmarks.md, section `service`).  Results do not depend on it.",
    )

    model_config = SettingsConfigDict(
        env_prefix="STREAM_INFLUENCE_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        allow_inf_nan=False,
        hide_input_in_errors=True,
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

    @model_validator(mode="after")
    def _scaleout_topics(self) -> AppSettings:
        problems: list[ConfigProblem] = []
        taken = {name: f"kafka.{field}" for field, name in self.kafka.topics().items()}
        for field in ("updates_topic", "model_topic"):
            name = getattr(self.scaleout, field)
            if not _TOPIC_NAME.fullmatch(name):
                problems.append(
                    ConfigProblem(
                        f"scaleout.{field}",
                        f"{name!r} is not a valid topic name",
                        "use 1-249 characters from letters, digits, '.', '_' and '-'",
                    )
                )
            elif name in taken:
                problems.append(
                    ConfigProblem(
                        f"scaleout.{field}", f"{name!r} is also {taken[name]}", "give it its own topic"
                    )
                )
            taken.setdefault(name, f"scaleout.{field}")
        _raise_problems(problems)
        return self


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def limit_blas_threads(threads: int) -> None:
    """Limit every loaded BLAS library to ``threads`` threads for the whole process (0: leave
    them alone): ``blas_threads``, applied by ``run`` (every role) and the offline commands
    (``replay``, ``score``, ``requeue``, ``demo``).  BLAS thread pools are process-wide, so this
    is a start-up setting, not a per-batch context."""
    if threads > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")


def load_config(path: Path | None = None) -> AppSettings:
    """The effective configuration: defaults ← YAML file ← environment."""
    data = read_yaml(path) if path is not None else {}
    try:
        return AppSettings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=str(path or "environment"))) from exc


def format_validation_error(exc: ValidationError, source: str) -> str:
    """Every error on its own line, with its dotted path and the reason; secrets masked."""
    lines: list[str] = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if err["type"] == "cross_field":
            for problem in err["ctx"]["problems"]:
                lines.append(
                    "  " + ConfigProblem(".".join([*loc, problem.path]), problem.message, problem.hint).line()
                )
            continue
        where = ".".join(loc) or "(top level)"
        # The input of a section-level error is the whole section: never echo a secret in it.
        shown = redact(err.get("input"), loc[-1] if loc else "")
        lines.append(f"  {where}: {err['msg']} (got {shown!r})")
    return "\n".join([f"{source}: {len(lines)} invalid setting(s):", *lines])


def check_environment(cfg: AppSettings) -> list[ConfigProblem]:
    """What the settings need from this machine: a writable checkpoint directory, a free metrics
    port, readable TLS files.  Read-only: creates nothing, binds nothing for longer than the check."""
    return [
        *_checkpoint_problems(cfg.checkpoint),
        *_metrics_problems(cfg.metrics),
        *_tls_file_problems(cfg.kafka),
    ]


def _checkpoint_problems(c: CheckpointSettings) -> list[ConfigProblem]:
    path = Path(c.directory).expanduser().absolute()
    try:
        return _checkpoint_dir_problems(path)
    except OSError as exc:  # e.g. under a directory the service's user cannot traverse
        return [
            ConfigProblem(
                "checkpoint.directory",
                f"cannot inspect {path}: {exc.strerror or exc}",
                "give the service's user access to the path, or choose another directory",
            )
        ]


def _checkpoint_dir_problems(path: Path) -> list[ConfigProblem]:
    if path.exists() and not path.is_dir():
        return [
            ConfigProblem("checkpoint.directory", f"{path} is not a directory", "point it at a directory")
        ]
    # The first existing ancestor decides whether the directory can be created.
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [
            ConfigProblem("checkpoint.directory", f"{existing} is not a directory", "choose another path")
        ]
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "writable" if existing == path else f"creatable ({existing} is not writable)"
        return [
            ConfigProblem(
                "checkpoint.directory",
                f"{path} is not {verb}",
                "give the service's user write access, or choose another directory",
            )
        ]
    return []


def _metrics_problems(m: MetricsSettings) -> list[ConfigProblem]:
    if not m.enabled or m.port == 0:
        return []
    try:
        infos = socket.getaddrinfo(m.host, m.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return [ConfigProblem("metrics.host", f"cannot resolve {m.host!r}: {exc}", "use an IP address")]
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the metrics server binds (http.server sets SO_REUSEADDR): only a live listener blocks it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            busy = exc.errno == errno.EADDRINUSE
            return [
                ConfigProblem(
                    "metrics.port",
                    f"cannot bind {m.host}:{m.port}: {'in use' if busy else exc.strerror or exc}",
                    "choose a free port, 0 for any, or metrics.enabled: false",
                )
            ]
    return []


def _tls_file_problems(k: KafkaSettings) -> list[ConfigProblem]:
    if k.security_protocol not in TLS_PROTOCOLS:
        return []
    problems = []
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(k, name)
        if path is not None and not (Path(path).is_file() and os.access(path, os.R_OK)):
            problems.append(
                ConfigProblem(
                    f"kafka.{name}", f"{path} is not a readable file", "give the path of a PEM file"
                )
            )
    return problems


def check_file(path: Path) -> list[str]:
    """Every mistake in a config file (``config check``): validation errors and environment
    problems, one line each; empty when the file is good."""
    data = read_yaml(path)
    try:
        cfg = AppSettings(**data)
    except ValidationError as exc:
        lines = format_validation_error(exc, str(path)).splitlines()[1:]
        # Check the machine against the sections that did validate, so every mistake shows at once.
        merged = _deep_merge(data, EnvSettingsSource(AppSettings)())
        sections: dict[str, Any] = {}
        for name in ("kafka", "checkpoint", "metrics"):
            model = AppSettings.model_fields[name].annotation
            try:
                sections[name] = model(**merged.get(name, {}))  # type: ignore[misc]
            except (ValidationError, TypeError):
                continue
        if "checkpoint" in sections:
            lines += ["  " + p.line() for p in _checkpoint_problems(sections["checkpoint"])]
        if "metrics" in sections:
            lines += ["  " + p.line() for p in _metrics_problems(sections["metrics"])]
        if "kafka" in sections:
            lines += ["  " + p.line() for p in _tls_file_problems(sections["kafka"])]
        return lines
    return ["  " + p.line() for p in check_environment(cfg)]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


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
        value = MASK
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
        "`stream-influence config check FILE` validates a file (fields, cross-field rules, checkpoint",
        "directory, metrics port, TLS files) and lists every error with its path and a hint.",
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
