"""Scale-out roles of ``stream-influence run --role score|update`` (see docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path

from stream_influence.config import AppSettings
from stream_influence.errors import ConfigError


def run_role(cfg: AppSettings, role: str, config_path: Path | None = None) -> int:
    raise ConfigError(f"--role {role} is not available yet in this build; use --role all")
