"""Shared pytest configuration.  Fixtures that start real services live in tests/fixtures/."""

from __future__ import annotations

pytest_plugins: list[str] = [
    "tests.fixtures.prometheus",
    "tests.fixtures.broker",
    "tests.fixtures.persistent_broker",
    "tests.fixtures.backends",
]
