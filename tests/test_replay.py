"""Offline replay through the CLI entry point (in process): decisions, report, plots, determinism."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from stream_influence.cli import main
from stream_influence.core.settings import EngineSettings
from stream_influence.offline.datasets import export_stream, load_stream
from stream_influence.offline.replay import iter_lines, replay

REPORT_KEYS = {
    "events",
    "accepted",
    "quarantined",
    "dead_lettered",
    "dead_letter_reasons",
    "prequential_accuracy",
    "shadow_prequential_accuracy",
    "test_accuracy",
    "shadow_test_accuracy",
    "events_per_second",
    "reference",
    "settings",
}


@pytest.fixture(scope="module")
def digits30(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Digits with 30 % symmetric noise, three seeds, exported as the CLI would."""
    root = tmp_path_factory.mktemp("digits30")
    dirs = []
    for seed in range(3):
        d = root / f"seed{seed}"
        export_stream(load_stream("digits", noise=0.3, seed=seed), d)
        dirs.append(d)
    return dirs


def _replay(d: Path, out: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> dict:
    args = ["replay", str(d / "events.jsonl"), "--reference", str(d / "reference.jsonl")]
    args += ["--test", str(d / "test.jsonl"), "--decisions", str(out / "decisions.jsonl")]
    args += ["--report", str(out / "report.json"), "--quiet", "--json", *extra]
    capsys.readouterr()
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "report.json").read_text())
    return report


def test_replay_digits_30pct(digits30: list[Path], tmp_path: Path, capsys) -> None:
    reports = []
    for i, d in enumerate(digits30):
        out = tmp_path / f"run{i}"
        extra = ("--plots", str(out / "plots")) if i == 0 else ()
        r = _replay(d, out, *extra, capsys=capsys)
        reports.append(r)
        assert r.keys() >= REPORT_KEYS
        events = [json.loads(x) for x in (d / "events.jsonl").read_text().splitlines()]
        decisions = [json.loads(x) for x in (out / "decisions.jsonl").read_text().splitlines()]
        # One decision per input line, in input order.
        assert [e["id"] for e in events] == [x["id"] for x in decisions]
        assert r["events"] == len(events) == r["accepted"] + r["quarantined"] + r["dead_lettered"]
        assert r["dead_lettered"] == 0 and r["updates_applied"] == r["accepted"]
        assert r["quarantined"] == sum(x["decision"] == "quarantine" for x in decisions) > 0
        assert r["reference"]["source"] == "file" and r["reference"]["events"] == 200
        assert r["settings"]["curvature"]["kind"] == "kfac" and "schema" in r["settings"]
        for x in decisions:
            assert x["decision"] in ("accept", "quarantine")
            assert all(math.isfinite(x[k]) for k in ("influence", "relative_influence", "self_influence"))
        # The quarantine route is mostly the corrupted events (the engine never saw the flags).
        q = [
            e["meta"]["corrupted"]
            for e, x in zip(events, decisions, strict=True)
            if x["decision"] == "quarantine"
        ]
        assert np.mean(q) > 0.7
    # Routed beats the unfiltered shadow on the clean test set.  Averaged over three seeds: on
    # seed 0 the two are within a point of each other (0.892 vs 0.897 when this was written),
    # on seeds 1 and 2 routing wins by 1–4 points.
    routed = np.mean([r["test_accuracy"] for r in reports])
    shadow = np.mean([r["shadow_test_accuracy"] for r in reports])
    assert routed > shadow + 0.005, (routed, shadow)

    pngs = sorted((tmp_path / "run0" / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["accuracy.png", "influence_hist.png", "quarantine_rate.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_same_seed_same_input_byte_identical(digits30: list[Path], tmp_path: Path, capsys) -> None:
    a = _replay(digits30[1], tmp_path / "a", capsys=capsys)
    b = _replay(digits30[1], tmp_path / "b", capsys=capsys)
    da = (tmp_path / "a" / "decisions.jsonl").read_bytes()
    assert da == (tmp_path / "b" / "decisions.jsonl").read_bytes()
    assert a["test_accuracy"] == b["test_accuracy"] and a["quarantined"] == b["quarantined"]
    # A different engine seed is still valid input; the decisions are deterministic per seed.
    cfg = tmp_path / "seed7.yaml"
    cfg.write_text("engine:\n  seed: 7\n")
    _replay(digits30[1], tmp_path / "c", "--config", str(cfg), capsys=capsys)
    _replay(digits30[1], tmp_path / "d", "--config", str(cfg), capsys=capsys)
    assert (tmp_path / "c" / "decisions.jsonl").read_bytes() == (
        tmp_path / "d" / "decisions.jsonl"
    ).read_bytes()


def test_malformed_lines_are_dead_lettered_with_reason(
    digits30: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = (digits30[0] / "events.jsonl").read_text().splitlines()[:700]
    bad = {
        100: ("{not json", "invalid_json"),
        200: (json.dumps({"id": "short", "features": [1.0, 2.0], "label": 3}), "wrong_dimension"),
        300: ('{"id": "nan", "features": [NaN' + ", 0.0" * 63 + '], "label": 1}', "non_finite"),
        400: (json.dumps({"id": "alien", "features": [0.0] * 64, "label": 42}), "unknown_label"),
        500: ("", "empty"),
        600: ("   ", "empty"),
        650: (json.dumps({"features": [0.0] * 64, "label": 1}), "missing_field"),
    }
    lines: list[str] = []
    expected: list[tuple[str | None, str | None]] = []  # (id, dead-letter reason) per input line
    for i, line in enumerate(good):
        if i in bad:
            raw, reason = bad[i]
            lines.append(raw)
            expected.append((None, reason))
        lines.append(line)
        expected.append((json.loads(line)["id"], None))
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert len(list(iter_lines(path))) == len(lines)  # the empty line is an input line
    cfg = tmp_path / "cfg.yaml"  # a fixed label space, so label 42 is unknown from the start
    cfg.write_text("engine:\n  schema:\n    classes: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n")

    # No --reference: the stream seeds the reference; progress bar on (goes to stderr).
    out = tmp_path / "decisions.jsonl"
    rc = main(
        [
            "replay",
            str(path),
            "--config",
            str(cfg),
            "--decisions",
            str(out),
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "dead-lettered" in stdout and "reference" in stdout  # the human summary
    decisions = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(decisions) == len(lines)
    for (eid, reason), dec in zip(expected, decisions, strict=True):
        if reason is None:
            assert dec["id"] == eid and dec["decision"] in ("accept", "quarantine")
        else:
            assert dec["decision"] == "dead_letter" and dec["reason"] == reason, dec
            assert dec["influence"] is None and dec["self_influence"] is None and dec["detail"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["dead_lettered"] == len(bad) and report["events"] == len(lines)
    assert report["accepted"] + report["quarantined"] == len(good)
    assert report["dead_letter_reasons"] == {
        "empty": 2,
        "invalid_json": 1,
        "missing_field": 1,
        "non_finite": 1,
        "unknown_label": 1,
        "wrong_dimension": 1,
    }
    assert report["reference"]["source"] == "stream"
    assert report["reference"]["seed_from_stream"] == 300
    # The buffer holds what was really seeded.
    assert report["reference"]["buffer_size"] == min(300, report["valid"])
    assert report["settings"]["reference"]["seed_from_stream"] == 300
    assert "test_accuracy" not in report


def test_replay_memory_is_bounded_by_the_batch_not_the_file(tmp_path: Path) -> None:
    d = tmp_path / "hp"
    export_stream(load_stream("hyperplane", noise=0.1, seed=0, n_events=20_000), d)
    size = (d / "events.jsonl").stat().st_size
    tracemalloc.start()
    try:
        result = replay(
            d / "events.jsonl",
            EngineSettings(),
            reference=d / "reference.jsonl",
            decisions=tmp_path / "dec.jsonl",
            batch_size=256,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.report["events"] == 20_000
    # The whole file would be > `size` bytes as Python objects; the replay holds one batch.
    assert peak < size / 4, (peak, size)
