"""Named exceptions.  Bad *events* never raise: they become rejects with a reason."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CurvatureError",
    "ExtractorError",
    "OutputError",
    "ReplayLimitError",
    "SchemaError",
    "StreamInfluenceError",
]


class StreamInfluenceError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(StreamInfluenceError):
    """A configuration file or value is invalid."""


class SchemaError(StreamInfluenceError):
    """Data that must define the schema (reference set, class list) is inconsistent."""


class CurvatureError(StreamInfluenceError):
    """A curvature re-factorisation failed (the matrix was not positive definite)."""


class ExtractorError(StreamInfluenceError):
    """The feature extractor φ could not be built or loaded."""


class CheckpointError(StreamInfluenceError):
    """A checkpoint is missing, corrupt, or was written by incompatible settings."""


class OutputError(StreamInfluenceError):
    """One output message could not be built or sent (encoding, serialisation, size): that
    message is dead-lettered, the stream goes on."""


class ReplayLimitError(StreamInfluenceError):
    """The same un-checkpointed window failed more than ``kafka.max_window_replays`` times."""
