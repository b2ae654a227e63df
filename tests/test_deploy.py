"""The deployment files in deploy/: every one parses, every configuration they carry passes
``stream-influence config check``, and every command they start is one the CLI accepts.

No container engine or Kubernetes cluster is available on the development machines, so these
tests check the files themselves; nothing here starts a container.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_influence.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
CONFIG_IN_CONTAINER = "/etc/stream-influence/config.yaml"

# Instructions a Dockerfile may hold (https://docs.docker.com/reference/dockerfile/).
DOCKERFILE_INSTRUCTIONS = frozenset(
    [
        "FROM",
        "RUN",
        "CMD",
        "LABEL",
        "EXPOSE",
        "ENV",
        "ADD",
        "COPY",
        "ENTRYPOINT",
        "VOLUME",
        "USER",
        "WORKDIR",
        "ARG",
        "ONBUILD",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "SHELL",
        "MAINTAINER",
    ]
)


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in ("config.yaml", "kustomization.yaml"):
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _k8s_docs() if d["kind"] == kind]


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        word, _, rest = logical.partition(" ")
        out.append((word.upper(), rest.strip()))
        logical = ""
    assert not logical, "the Dockerfile ends inside a continued line"
    return out


# -- every file parses ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_in_deploy_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: not a YAML mapping"


def test_dockerfile_builds_the_cli_as_a_non_root_user_with_the_torch_pin() -> None:
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    unknown = [w for w, _ in steps if w not in DOCKERFILE_INSTRUCTIONS]
    assert not unknown, f"not Dockerfile instructions: {unknown}"
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(a for w, a in steps if w == "RUN")
    assert "-c .ci/constraints.txt" in runs, "pip must install with the torch pin"
    assert "torch==2.13.0" in (ROOT / ".ci" / "constraints.txt").read_text()
    # Every local source it copies exists (the build context is the repository root).
    for w, a in steps:
        if w == "COPY" and not a.startswith("--from"):
            *sources, _dest = shlex.split(a)
            for s in sources:
                assert (ROOT / s).exists(), f"COPY {s}: no such file in the build context"
    users = [a for w, a in steps if w == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    entry = [a for w, a in steps if w == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1]) == ["stream-influence"]
    cmd = yaml.safe_load([a for w, a in steps if w == "CMD"][-1])
    assert_cli_accepts(cmd)


def test_compose_runs_kafka_in_kraft_mode_n_scorers_one_updater_prometheus_and_grafana() -> None:
    services = _compose()["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "KRaft mode"
    assert "ZOOKEEPER" not in " ".join(env)
    assert services["scorer"]["deploy"]["replicas"] >= 2
    assert services["updater"]["deploy"]["replicas"] == 1
    assert _role(services["scorer"]["command"]) == "score"
    assert _role(services["updater"]["command"]) == "update"
    # Mounted files exist (paths relative to deploy/, where compose.yaml is).
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: mounts {src}, which does not exist"
    # Grafana gets the shipped dashboard and its provider; Prometheus the compose scrape config.
    mounts = " ".join(services["grafana"]["volumes"])
    assert "../grafana/dashboards:" in mounts and "provisioning/dashboards" in mounts
    prom = " ".join(services["prometheus"]["volumes"])
    assert "./prometheus/compose.yml:" in prom and "./prometheus/rules:" in prom


@pytest.mark.skipif(
    shutil.which("promtool") is None and os.environ.get("CI") != "true", reason="promtool not installed"
)
def test_compose_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is required in CI (.ci/run installs Debian's prometheus)"
    out = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus" / "compose.yml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_k8s_manifests_scorer_deployment_autoscaled_on_lag_and_one_updater_with_a_volume() -> None:
    config = yaml.safe_load((K8S / "config.yaml").read_text())
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    generated = {g["name"]: g["files"] for g in kustomization["configMapGenerator"]}
    assert generated["stream-influence-config"] == ["config.yaml"]

    (scorer,) = _kind("Deployment")
    (updater,) = _kind("StatefulSet")
    assert updater["spec"]["replicas"] == 1
    assert _role(_container(scorer)["args"]) == "score"
    assert _role(_container(updater)["args"]) == "update"
    claims = {c["metadata"]["name"] for c in updater["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in _container(updater)["volumeMounts"]}
    assert mounts[claims.pop()] == config["checkpoint"]["directory"], "checkpoints on the PVC"
    for workload in (scorer, updater):
        spec = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["config"]["configMap"]["name"] in generated
        assert {m["name"]: m["mountPath"] for m in _container(workload)["volumeMounts"]}["config"] == (
            str(Path(CONFIG_IN_CONTAINER).parent)
        )
        assert spec["securityContext"]["runAsNonRoot"] is True
        ports = {p["containerPort"] for p in _container(workload)["ports"]}
        assert config["metrics"]["port"] in ports

    (scaled,) = _kind("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == scorer["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == config["kafka"]["group_id"]
    assert trigger["metadata"]["topic"] == config["kafka"]["topic"]
    assert int(trigger["metadata"]["lagThreshold"]) > 0

    services = _kind("Service")
    assert {s["spec"]["selector"]["app.kubernetes.io/component"] for s in services} == {"scorer", "updater"}
    for svc in services:
        ann = svc["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert int(ann["prometheus.io/port"]) == config["metrics"]["port"]


# -- configurations pass `config check` ------------------------------------------------------------
CONFIGS = [DEPLOY / "compose" / "config.yaml", K8S / "config.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_carried_config_passes_config_check(path: Path, tmp_path: Path) -> None:
    # The machine checks (a writable checkpoint directory, a free metrics port) are about the
    # container, not this machine: point them here through the environment, as an operator would.
    env = {
        **os.environ,
        "STREAM_INFLUENCE_CHECKPOINT__DIRECTORY": str(tmp_path / "ck"),
        "STREAM_INFLUENCE_METRICS__PORT": "0",
    }
    out = subprocess.run(
        [sys.executable, "-m", "stream_influence", "config", "check", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("OK")


def test_config_check_would_catch_a_broken_carried_config(tmp_path: Path) -> None:
    """The check above can fail: a typo in a carried file is reported."""
    bad = tmp_path / "config.yaml"
    bad.write_text((K8S / "config.yaml").read_text().replace("group_id:", "group_idd:"))
    out = subprocess.run(
        [sys.executable, "-m", "stream_influence", "config", "check", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 1 and "group_idd" in out.stderr


def test_every_config_mounted_is_a_carried_config() -> None:
    services = _compose()["services"]
    for name in ("scorer", "updater"):
        sources = {v.split(":")[0] for v in services[name]["volumes"] if CONFIG_IN_CONTAINER in v}
        assert sources == {"./compose/config.yaml"}, name
        assert DEPLOY / "compose" / "config.yaml" in CONFIGS


# -- every command they start exists in the CLI ----------------------------------------------------
def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _role(argv: list[str]) -> str:
    return vars(build_parser().parse_args(argv))["role"]


def _started_commands() -> list[tuple[str, list[str]]]:
    """Every stream-influence argv the deploy files start (the image's entrypoint is the CLI)."""
    out: list[tuple[str, list[str]]] = []
    for name, svc in _compose()["services"].items():
        if svc.get("image", "").startswith("stream-influence"):
            out.append((f"compose:{name}", svc["command"]))
    for workload in [*_kind("Deployment"), *_kind("StatefulSet")]:
        c = _container(workload)
        assert "command" not in c, "keep the image's entrypoint (the CLI)"
        out.append((f"k8s:{workload['metadata']['name']}", c["args"]))
    return out


def assert_cli_accepts(argv: list[str]) -> None:
    """``argv`` parses with the CLI's own argparse parser (no ``--help``, nothing run)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"the CLI rejects {argv}") from exc
    assert callable(args.handler)


def test_deploy_files_start_commands() -> None:
    started = _started_commands()
    assert len(started) >= 4, started  # compose scorer + updater, k8s scorer + updater


@pytest.mark.parametrize("where,argv", _started_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_command_the_deploy_files_start_exists_in_the_cli(where: str, argv: list[str]) -> None:
    assert_cli_accepts(argv)
    args = build_parser().parse_args(argv)
    assert str(args.config) == CONFIG_IN_CONTAINER, f"{where}: reads the mounted config"


@pytest.mark.parametrize(
    "argv", [["run", "--role", "scorer"], ["serve", "--config", "x.yaml"], ["run", "--confg", "x"]]
)
def test_the_command_check_rejects_what_the_cli_does_not_have(argv: list[str]) -> None:
    with pytest.raises(AssertionError, match="the CLI rejects"):
        assert_cli_accepts(argv)


def test_compose_creates_the_model_topic_compacted_under_the_configured_name() -> None:
    from stream_influence.config import load_config

    cfg = load_config(DEPLOY / "compose" / "config.yaml")
    command = " ".join(_compose()["services"]["topics"]["command"])
    model = command.split(f"--topic {cfg.scaleout.model_topic} ")[1].split("&&")[0]
    assert "--partitions 1" in model and "cleanup.policy=compact" in model
    assert f"--topic {cfg.scaleout.updates_topic} " in command
    for role in ("scorer", "updater"):
        wait = _compose()["services"][role]["depends_on"]["topics"]["condition"]
        assert wait == "service_completed_successfully"
