"""TLS to the broker, end to end, through a TLS-terminating proxy (stunnel) in front of the
embedded broker, which advertises the proxy's address (its own TLS did not work; see
../shared/notes/test-broker.md).  The service consumes, quarantines and commits through TLS; a wrong
CA and an unreachable TLS endpoint fail fast with one clear line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from stream_influence.tooling.embedded import EmbeddedBroker, free_port
from tests.fixtures.service_events import (
    consumed,
    events,
    latest_checkpoint,
    start_service,
    wait_for,
    write_config,
)
from tests.test_startup import REFUSED, SLACK_S, assert_one_clear_line, run_cli
from tests.test_startup import write_config as write_startup_config

pytestmark = pytest.mark.integration

# How each backend's client names a certificate its CA did not sign.
UNVERIFIED = {"kafka-python": "CERTIFICATE_VERIFY_FAILED", "confluent": "certificate verify failed"}


def _tool(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail(f"{names[0]} is not installed (.ci/run installs it)")
    pytest.skip(f"{names[0]} is not installed (apt-get install -y {names[0]})")


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (subjectAltName IP, so hostname checks pass) and its key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}"]
    args += ["-keyout", str(key), "-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [_tool("openssl"), *args],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


class ProxiedBroker(EmbeddedBroker):
    """The embedded broker advertising the TLS proxy: only TLS clients get past bootstrap."""

    def __init__(self, port: int, tls_port: int, cafile: Path, log_path: Path) -> None:
        super().__init__(port=port, log_path=log_path, advertised_listener=f"tcp://127.0.0.1:{tls_port}")
        self.tls_bootstrap, self.cafile = f"127.0.0.1:{tls_port}", cafile

    def _probe(self, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                admin = KafkaAdminClient(**self.ssl_options(), request_timeout_ms=2000)
                try:
                    admin.list_topics()
                    return
                finally:
                    admin.close()
            except Exception as exc:
                last = exc
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"broker behind the TLS proxy not ready: {last}")

    def ssl_options(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.tls_bootstrap,
            "security_protocol": "SSL",
            "ssl_cafile": str(self.cafile),
        }


@dataclass
class Tls:
    broker: ProxiedBroker
    cert: Path
    other_ca: Path  # a valid certificate that did not sign the proxy's


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    stunnel = _tool("stunnel4", "stunnel")
    d = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(d, "proxy")
    other_ca, _ = self_signed(d, "other")
    broker_port, tls_port = free_port(), free_port()
    conf = d / "stunnel.conf"
    conf.write_text(
        f"foreground = yes\npid =\noutput = {d / 'stunnel.log'}\n"
        f"[kafka]\naccept = 127.0.0.1:{tls_port}\nconnect = 127.0.0.1:{broker_port}\n"
        f"cert = {cert}\nkey = {key}\n"
    )
    proxy = subprocess.Popen(
        [stunnel, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    broker = ProxiedBroker(broker_port, tls_port, cert, d / "broker.log")
    try:
        broker.start(timeout=60)
        yield Tls(broker, cert, other_ca)
    finally:
        broker.stop()
        proxy.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proxy.wait(10)
        if proxy.poll() is None:
            proxy.kill()


def _create(tls: Tls, *names: str) -> None:
    admin = KafkaAdminClient(**tls.broker.ssl_options(), request_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(n, num_partitions=1, replication_factor=1) for n in names])
    finally:
        admin.close()


def _produce(tls: Tls, topic: str, values: list[bytes]) -> None:
    p = KafkaProducer(**tls.broker.ssl_options(), enable_idempotence=False, linger_ms=20, acks=1)
    try:
        for v in values:
            p.send(topic, v)
        p.flush(60)
    finally:
        p.close()


def _count(tls: Tls, topic: str, at_least: int, timeout: float = 60) -> int:
    c = KafkaConsumer(**tls.broker.ssl_options(), enable_auto_commit=False, group_id=None)
    tp = TopicPartition(topic, 0)
    try:
        c.assign([tp])
        c.seek_to_beginning(tp)
        n, deadline = 0, time.monotonic() + timeout
        while time.monotonic() < deadline:
            n += sum(len(b) for b in c.poll(timeout_ms=300, max_records=5000).values())
            hw = c.highwater(tp)
            if n >= at_least and hw is not None and c.position(tp) >= hw:
                break
        return n
    finally:
        c.close()


def test_service_consumes_quarantines_and_commits_through_tls(
    tls: Tls, tmp_path: Path, kafka_client: str
) -> None:
    topic, ref = f"tls-{time.monotonic_ns()}", f"tls-ref-{time.monotonic_ns()}"
    _create(tls, topic, ref, f"{topic}.quarantine", f"{topic}.dead-letter")
    _produce(tls, ref, events(300, seed=7, prefix="ref")[0])
    good, _ = events(3000, noise=0.3, seed=1)
    _produce(tls, topic, good)
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tls.broker.tls_bootstrap,
        topic,
        tmp_path / "ck",
        kafka={
            "client": kafka_client,
            "reference_topic": ref,
            "security_protocol": "SSL",
            "ssl_cafile": str(tls.cert),
        },
    )
    log = tmp_path / "svc.log"
    proc = start_service(cfg, log)
    try:
        wait_for(lambda: consumed(tmp_path / "ck") >= 3000 or proc.poll() is not None, 180, what="consumed")
    finally:
        if proc.poll() is None:
            proc.terminate()
        rc = proc.wait(60)
    assert rc == 0, log.read_text()[-3000:]
    c = latest_checkpoint(tmp_path / "ck").engine.counters
    assert c.consumed == 3000 and c.quarantined > 0
    assert _count(tls, f"{topic}.quarantine", c.quarantined) == c.quarantined
    group = KafkaConsumer(**tls.broker.ssl_options(), group_id=f"{topic}-group", enable_auto_commit=False)
    try:
        assert group.committed(TopicPartition(topic, 0)) == 3000
    finally:
        group.close()


def test_wrong_ca_fails_fast_with_one_line(tls: Tls, tmp_path: Path, kafka_client: str) -> None:
    timeout_s = 3.0
    cfg = write_startup_config(
        tmp_path / "c.yaml",
        {
            "client": kafka_client,
            "bootstrap_servers": tls.broker.tls_bootstrap,
            "security_protocol": "SSL",
            "ssl_cafile": str(tls.other_ca),
            "startup_timeout_seconds": timeout_s,
        },
    )
    rc, output, wall = run_cli(cfg, timeout=timeout_s + SLACK_S + 60)
    assert rc != 0
    assert_one_clear_line(output, tls.broker.tls_bootstrap, UNVERIFIED[kafka_client])
    assert wall < timeout_s + SLACK_S, f"took {wall:.1f}s"


def test_unreachable_tls_endpoint_fails_fast_with_one_line(
    tls: Tls, tmp_path: Path, kafka_client: str
) -> None:
    timeout_s = 3.0
    bootstrap = f"127.0.0.1:{free_port()}"
    cfg = write_startup_config(
        tmp_path / "c.yaml",
        {
            "client": kafka_client,
            "bootstrap_servers": bootstrap,
            "security_protocol": "SSL",
            "ssl_cafile": str(tls.cert),
            "startup_timeout_seconds": timeout_s,
        },
    )
    rc, output, wall = run_cli(cfg, timeout=timeout_s + SLACK_S + 60)
    assert rc != 0
    assert_one_clear_line(output, bootstrap, REFUSED[kafka_client])
    assert wall < timeout_s + SLACK_S, f"took {wall:.1f}s"


def test_confluent_backend_maps_tls_settings(tls: Tls) -> None:
    """The librdkafka names the confluent backend builds (security.protocol, ssl.ca.location,
    hostname check) carry a real TLS session: check, produce and read back through the proxy;
    a CA that did not sign the proxy's certificate is refused with the cause."""
    from stream_influence.config import KafkaSettings
    from stream_influence.errors import BrokerUnreachableError
    from stream_influence.io.broker import OutputRecord, TopicPartition, open_broker
    from tests.fixtures.backends import require

    require("confluent")
    topic = f"tls-ck-{time.monotonic_ns()}"
    _create(tls, topic)
    settings = {
        "client": "confluent",
        "bootstrap_servers": tls.broker.tls_bootstrap,
        "topic": topic,
        "security_protocol": "SSL",
    }
    backend = open_broker(KafkaSettings(**settings, ssl_cafile=tls.cert))
    backend.check(30)
    producer = backend.producer()
    sent = [producer.produce(OutputRecord(topic, None, b"v%d" % i, [("h", b"x")])) for i in range(50)]
    producer.flush(60)
    assert all(d.done and d.error is None for d in sent)
    producer.close(5)
    assert _count(tls, topic, 50) == 50  # kafka-python, also through TLS, sees them
    reader = backend.consumer(group=False)
    reader.assign([TopicPartition(topic, 0)])
    got: list[Any] = []
    deadline = time.monotonic() + 60
    while len(got) < 50 and time.monotonic() < deadline:
        got.extend(r for recs in reader.poll(300, 100).values() for r in recs)
    reader.close(5000)
    assert [r.value for r in got] == [b"v%d" % i for i in range(50)]

    wrong = open_broker(KafkaSettings(**settings, ssl_cafile=tls.other_ca))
    with pytest.raises(BrokerUnreachableError, match=r"(?i)certificate verify failed") as err:
        wrong.check(3)
    assert tls.broker.tls_bootstrap in str(err.value)
