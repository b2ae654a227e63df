"""`stream-influence run` against a broker that is not there fails fast with one clear line (defect 8).

Before: ~72 s and a raw ``KafkaTimeoutError`` traceback after 110-190 kafka-python ERROR lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stream_influence.tooling.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
# Interpreter and import time on a loaded machine come on top of the start-up timeout.
SLACK_S = float(os.environ.get("STREAM_INFLUENCE_TEST_STARTUP_SLACK_S", "30"))
# How each backend's client names a refused connection (the cause the one line must carry).
REFUSED = {"kafka-python": "ECONNREFUSED", "confluent": "Connection refused"}


def run_cli(config: Path, timeout: float) -> tuple[int, str, float]:
    """Exit code, combined output and wall time of ``stream-influence run --config config``."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "stream_influence", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def write_config(path: Path, kafka: dict[str, object]) -> Path:
    cfg = {
        "kafka": kafka,
        "checkpoint": {"directory": str(path.parent / "ck")},
        "metrics": {"port": 0},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_one_clear_line(output: str, bootstrap: str, cause: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    line = lines[0]
    assert line.startswith(f"error: cannot reach the Kafka broker(s) {bootstrap}"), line
    assert cause in line, line
    assert "Traceback" not in output
    return line


@pytest.mark.integration
def test_unreachable_broker_exits_fast_with_one_line(tmp_path: Path, kafka_client: str) -> None:
    timeout_s = 3.0
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    cfg = write_config(
        tmp_path / "c.yaml",
        {"client": kafka_client, "bootstrap_servers": bootstrap, "startup_timeout_seconds": timeout_s},
    )
    rc, output, wall = run_cli(cfg, timeout=timeout_s + SLACK_S + 60)
    assert rc != 0
    assert_one_clear_line(output, bootstrap, REFUSED[kafka_client])
    assert wall < timeout_s + SLACK_S, f"took {wall:.1f}s"
    assert not (tmp_path / "ck").exists(), "nothing written before the broker answered"
