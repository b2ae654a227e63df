"""Hot reload of the routing policy (thresholds, score kind, warm-up, rate cap).

The policy is read from the ``engine.policy`` section of the configuration file — the same file
the service started with — on SIGHUP and whenever the file's modification time or size changes.
A file that does not parse or validate is rejected: the error is logged, the caller counts it, and
the policy in force stays.  Only the policy is hot: changes to other sections are ignored until
a restart.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "cfg.yaml"
>>> _ = path.write_text("engine:\\n  policy:\\n    quarantine_threshold: 0.1\\n")
>>> reloader = PolicyReloader(path, PolicySettings())
>>> reloader.request()                        # what the SIGHUP handler does
>>> outcome = reloader.poll()
>>> outcome.ok, outcome.policy.quarantine_threshold
(True, 0.1)
>>> reloader.poll() is None                   # nothing changed since
True
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from stream_influence.config import format_validation_error, load_config
from stream_influence.core.settings import PolicySettings
from stream_influence.errors import ConfigError

__all__ = ["PolicyReloader", "ReloadOutcome"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    ok: bool
    policy: PolicySettings | None = None  # the new policy when ok and it differs
    error: str | None = None


class PolicyReloader:
    """Polls one config file for policy changes; :meth:`request` forces a re-read (SIGHUP)."""

    def __init__(self, path: Path | None, current: PolicySettings) -> None:
        self.path = Path(path) if path is not None else None
        self.current = current
        self._stamp = self._stat()
        self._requested = False

    def _stat(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def request(self) -> None:
        """Ask for a reload at the next :meth:`poll` (safe to call from a signal handler)."""
        self._requested = True

    def poll(self) -> ReloadOutcome | None:
        """``None`` if nothing to do; else the outcome of reading the file again."""
        if self.path is None:
            self._requested = False
            return None
        stamp = self._stat()
        if not self._requested and stamp == self._stamp:
            return None
        self._requested = False
        self._stamp = stamp
        try:
            policy = load_config(self.path).engine.policy
        except (ConfigError, ValidationError) as exc:
            msg = (
                format_validation_error(exc, str(self.path)) if isinstance(exc, ValidationError) else str(exc)
            )
            log.error("policy reload rejected, keeping policy in force: %s", msg)
            return ReloadOutcome(ok=False, error=msg)
        if policy == self.current:
            return None
        log.info("routing policy reloaded from %s", self.path)
        self.current = policy
        return ReloadOutcome(ok=True, policy=policy)
