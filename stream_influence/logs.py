"""Logging set-up: plain or structured JSON lines.

Levels used across the service: per-batch event counts at DEBUG, decision summaries at INFO,
rejects at WARNING (aggregated per batch — never one line per event at INFO).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from .config import LoggingSettings

__all__ = ["JsonFormatter", "setup_logging"]

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={...}`` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(settings: LoggingSettings, *, verbose: bool = False) -> None:
    """Configure the root logger once (replacing earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else settings.level)
    # kafka-python is chatty at INFO about every connection attempt.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
