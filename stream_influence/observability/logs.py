"""Logging set-up: plain or structured JSON lines.

Levels used across the service: per-batch event counts at DEBUG, decision summaries at INFO,
rejects at WARNING (aggregated per batch — never one line per event at INFO).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from stream_influence.config import MASK, LoggingSettings

__all__ = ["JsonFormatter", "RateLimitFilter", "RedactFilter", "setup_logging"]

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
        if record.exc_info or record.exc_text:  # exc_text: the traceback RedactFilter masked
            out["exc_info"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class RateLimitFilter(logging.Filter):
    """Lets the first ``burst`` records of a kind through per ``window_s``, then holds the rest
    back; the first record of the next window says how many were held back.

    A kind is (logger, message template), so a client retrying a dead broker every 50 ms logs a
    few lines and a count rather than hundreds of lines.  Applies to loggers under ``prefixes``.
    """

    def __init__(
        self,
        # The client libraries' loggers: kafka-python's, and librdkafka's (io/confluent.py).
        prefixes: tuple[str, ...] = ("kafka", "stream_influence.io.librdkafka"),
        burst: int = 3,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.prefixes, self.burst, self.window_s, self.clock = prefixes, burst, window_s, clock
        self._kinds: dict[tuple[str, str], list[float | int]] = {}  # kind -> [window start, seen]

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        kind = (record.name, str(record.msg))
        now = self.clock()
        state = self._kinds.setdefault(kind, [now, 0])
        if now - state[0] >= self.window_s:
            held = int(state[1]) - self.burst
            state[0], state[1] = now, 0
            if held > 0:
                record.msg = (
                    f"[{held} similar line(s) held back in the last {self.window_s:.0f}s] {record.msg}"
                )
        state[1] = int(state[1]) + 1
        if state[1] == self.burst:
            record.msg = f"{record.msg} [further lines like this held back for {self.window_s:.0f}s]"
        return state[1] <= self.burst


class RedactFilter(logging.Filter):
    """Masks the given secret values wherever they appear in a log line or its traceback.

    The settings never print secrets, but kafka-python logs its whole configuration at DEBUG
    (``Starting KafkaAdminClient with configuration: {...}``), password included.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def _mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = self._mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._mask(record.exc_text)
        for key, value in list(vars(record).items()):  # extra= fields, printed by JsonFormatter
            if key not in _RESERVED and isinstance(value, str):
                setattr(record, key, self._mask(value))
        return True


def setup_logging(settings: LoggingSettings, *, verbose: bool = False, secrets: Iterable[str] = ()) -> None:
    """Configure the root logger once (replacing earlier handlers); ``secrets`` are masked."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactFilter(secrets))
    if settings.json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not verbose:  # -v shows kafka-python's every line
        handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else settings.level)
    # kafka-python is chatty at INFO about every connection attempt.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
