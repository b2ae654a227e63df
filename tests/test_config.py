"""Configuration: YAML + environment, `config check`, the generated example and reference,
policy hot reload and structured logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from stream_influence.cli import main
from stream_influence.config import AppSettings, _walk, example_yaml, load_config, reference_markdown
from stream_influence.core.settings import PolicySettings
from stream_influence.errors import ConfigError
from stream_influence.observability.logs import JsonFormatter
from stream_influence.service.reload import PolicyReloader

ROOT = Path(__file__).resolve().parents[1]


def test_config_check_reports_every_mistake(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "engine:\n  curvature:\n    damping: -1\n  policy:\n    quantile: 3\nkafka:\n  topicc: x\n"
    )
    assert main(["config", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "3 invalid setting(s)" in err
    for path in ("engine.curvature.damping", "engine.policy.quantile", "kafka.topicc"):
        assert path in err
    assert "greater than 0" in err and "hint:" in err


def test_config_check_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(ROOT / "deploy" / "config.example.yaml")]) == 0
    assert "OK" in capsys.readouterr().out


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kafka:\n  topic: from-file\n  group_id: g1\nengine:\n  policy:\n    warmup_events: 7\n")
    monkeypatch.setenv("STREAM_INFLUENCE_KAFKA__TOPIC", "from-env")
    monkeypatch.setenv("STREAM_INFLUENCE_ENGINE__POLICY__QUARANTINE_THRESHOLD", "0.25")
    s = load_config(cfg)
    assert (s.kafka.topic, s.kafka.group_id) == ("from-env", "g1")
    assert (s.engine.policy.warmup_events, s.engine.policy.quarantine_threshold) == (7, 0.25)


def test_invalid_yaml_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("engine: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(cfg)


def test_config_show_masks_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAM_INFLUENCE_KAFKA__SASL_PLAIN_PASSWORD", "hunter2")
    # A password is only accepted with a SASL protocol, a mechanism and a user name.
    monkeypatch.setenv("STREAM_INFLUENCE_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAM_INFLUENCE_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("STREAM_INFLUENCE_KAFKA__SASL_PLAIN_USERNAME", "svc")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    assert json.loads(out)["kafka"]["sasl_plain_password"] == "**********"


def test_every_setting_is_documented() -> None:
    undocumented = [name for name, _, _, desc in _walk(AppSettings) if not desc]
    assert undocumented == []


def test_generated_files_are_up_to_date() -> None:
    assert (ROOT / "deploy" / "config.example.yaml").read_text() == example_yaml(), (
        "run: stream-influence config example > deploy/config.example.yaml"
    )
    assert (ROOT / "docs" / "configuration.md").read_text() == reference_markdown(), (
        "run: stream-influence config reference > docs/configuration.md"
    )


def test_policy_reload_applies_valid_and_rejects_broken_files(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("engine:\n  policy:\n    quarantine_threshold: 0.1\n")
    reloader = PolicyReloader(cfg, PolicySettings())
    assert reloader.poll() is None  # unchanged file, no request
    reloader.request()
    first = reloader.poll()
    assert first is not None and first.ok and first.policy is not None
    assert first.policy.quarantine_threshold == 0.1

    cfg.write_text("engine:\n  policy:\n    quarantine_threshold: 0.3\n    accept_threshold: 0.5\n")
    broken = reloader.poll()  # the size changed, so the file is re-read without a request
    assert broken is not None and not broken.ok and "accept_threshold" in (broken.error or "")
    assert reloader.current.quarantine_threshold == 0.1  # the old policy stays in force

    cfg.write_text("engine:\n  policy:\n    quarantine_threshold: 0.35\n")
    fixed = reloader.poll()
    assert fixed is not None and fixed.ok and fixed.policy is not None
    assert fixed.policy.quarantine_threshold == 0.35


def test_json_log_lines_parse_and_carry_extra_fields() -> None:
    record = logging.LogRecord(
        "stream_influence.service.loop", logging.INFO, __file__, 1, "batch %d", (3,), None
    )
    record.accepted = 10
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "batch 3" and line["accepted"] == 10 and line["level"] == "INFO"
