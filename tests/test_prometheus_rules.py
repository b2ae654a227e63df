"""promtool: the scrape config and alert rules are valid, and the rules' unit tests pass."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules" / "stream-influence.yml"
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))


def run(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_check_config(promtool: str) -> None:
    out = run(promtool, "check", "config", PROM / "prometheus.yml")
    assert "1 rule files found" in out.stdout + out.stderr


def test_check_rules(promtool: str) -> None:
    run(promtool, "check", "rules", RULES)


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests(promtool: str, test_file: Path) -> None:
    run(promtool, "test", "rules", test_file)


def test_every_alert_has_a_unit_test() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tested = {
        case["alertname"]
        for f in RULE_TESTS
        for t in yaml.safe_load(f.read_text())["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts, "no alerts found"
    assert alerts - tested == set(), "alerts without a firing unit test"


def test_rule_unit_tests_can_fail(promtool: str, tmp_path: Path) -> None:
    """A rule that never fires must make `promtool test rules` fail (the tests have teeth)."""
    broken = yaml.safe_load(RULES.read_text())
    for group in broken["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "StreamInfluenceQuarantineAlarm":
                rule["expr"] = "vector(0) > 1"
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / RULES.name).write_text(yaml.safe_dump(broken))
    (tmp_path / "tests").mkdir()
    for f in RULE_TESTS:
        shutil.copy(f, tmp_path / "tests" / f.name)
    proc = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "tests" / RULE_TESTS[0].name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "StreamInfluenceQuarantineAlarm" in proc.stdout + proc.stderr


def test_missing_binary_skips_locally_and_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.fixtures.prometheus import require_binary

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no prometheus here
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not on PATH"):
        require_binary("prometheus")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_binary("prometheus")
