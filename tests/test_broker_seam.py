"""The broker seam: kafka-python is known to one backend module only (and the embedded broker's
readiness probe); everything else goes through :mod:`stream_influence.io.broker`."""

from __future__ import annotations

from stream_influence.io.broker import TopicPartition
from tests.test_layers import PKG, imported_modules

ALLOWED = {"io/kafka_python.py", "tooling/embedded.py"}


def test_only_the_backend_imports_kafka_python() -> None:
    importers = {
        str(path.relative_to(PKG))
        for path in PKG.rglob("*.py")
        if any(mod == "kafka" or mod.startswith("kafka.") for mod in imported_modules(path))
    }
    assert importers <= ALLOWED, sorted(importers - ALLOWED)
    assert "io/kafka_python.py" in importers  # the check sees imports at all


def test_our_topic_partition_is_kafka_pythons() -> None:
    # Interchangeable as dict keys: records the backend keys by either land in the same buffer.
    from kafka import TopicPartition as KafkaTP

    assert TopicPartition("t", 3) == KafkaTP("t", 3)
    assert {KafkaTP("t", 3): 1}[TopicPartition("t", 3)] == 1
