"""The package's layers, enforced: each folder imports only the layers beneath it.

``core`` is pure math and state (no broker, no metrics, no files beyond its own state codec);
``io`` talks to the broker; ``service`` composes them; ``observability``, ``offline`` and
``tooling`` sit beside. A newcomer can trust the tree: a change to the math never drags Kafka in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "stream_influence"

# Layer -> stream_influence subpackages/modules it must not import (at module level or lazily).
FORBIDDEN: dict[str, set[str]] = {
    "core": {"io", "service", "observability", "offline", "tooling", "cli", "config"},
    "io": {"service", "observability", "offline", "tooling", "cli"},
    "observability": {"io", "service", "offline", "tooling", "cli"},
    "offline": {"io", "service", "tooling", "cli"},
    "service": {"offline", "tooling", "cli"},
}
# Third-party clients that belong to one layer only.
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "core": {"kafka", "confluent_kafka", "prometheus_client"},
    "offline": {"kafka", "confluent_kafka", "prometheus_client"},
}


def imported_modules(path: Path, root: Path = PKG.parent) -> set[str]:
    """Absolute dotted names this file imports, including imports inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = path.relative_to(root).with_suffix("").parts
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = list(parts[: len(parts) - node.level])
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


def _files(layer: str) -> list[Path]:
    return sorted((PKG / layer).rglob("*.py"))


def test_every_layer_folder_exists() -> None:
    for layer in FORBIDDEN:
        assert (PKG / layer / "__init__.py").is_file(), layer


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_lies_beneath(layer: str) -> None:
    bad: list[str] = []
    for path in _files(layer):
        for mod in imported_modules(path):
            head = mod.split(".")
            if head[0] == "stream_influence" and len(head) > 1 and head[1] in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(PKG)} imports {mod}")
            if head[0] in FORBIDDEN_THIRD_PARTY.get(layer, set()):
                bad.append(f"{path.relative_to(PKG)} imports {mod}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    # The rule above must be able to fail: a lazy import inside a function is found too.
    f = tmp_path / "stream_influence" / "core" / "probe.py"
    f.parent.mkdir(parents=True)
    f.write_text("def f():\n    from ..io import kafka_io\n    import kafka\n")
    mods = imported_modules(f, root=tmp_path)
    assert "stream_influence.io.kafka_io" in mods and "kafka" in mods
