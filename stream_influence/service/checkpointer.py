"""The checkpointer: flush → checkpoint → commit, in that order (docs/architecture.md,
"The checkpoint, step by step").

1. **Flush** the producer and check every output of the window was acknowledged
   (:meth:`~stream_influence.service.emitter.Emitter.settle`); if not, nothing is written and the
   caller rolls the window back;
2. **write the checkpoint** (engine state + next input offsets) atomically;
3. **commit** the same offsets to Kafka.  A failed commit is logged and redone with the next
   checkpoint: the checkpoint is what the service seeks to.

Committing first (then crashing) would lose the window's outputs; writing the checkpoint before
the flush would make outputs that may never arrive part of the durable model.

On the interval the state is serialised on the loop thread and written on the store's writer
thread (``background``): the loop goes on processing meanwhile, and commits the checkpoint's
offsets once it is durable and every output produced so far is acknowledged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from stream_influence.config import KafkaSettings
from stream_influence.core.engine import InfluenceEngine
from stream_influence.io.broker import BrokerConsumer, TopicPartition
from stream_influence.service.checkpoint import CheckpointStore, PendingCheckpoint
from stream_influence.service.emitter import Emitter

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)


class Checkpointer:
    """Steps 1–3 over the store, the emitter and the consumer the loop gives it."""

    def __init__(self, store: CheckpointStore, emitter: Emitter, k: KafkaSettings) -> None:
        self.store, self.emitter, self.k = store, emitter, k

    def flush_and_save(
        self,
        engine: InfluenceEngine,
        offsets: Mapping[tuple[str, int], int],
        reference_offsets: Mapping[int, int],
        reason: str,
        flush_timeout_s: float,
        extra: Callable[[], Mapping[str, Any]] | None = None,
        *,
        background: bool = False,
    ) -> Path | PendingCheckpoint | None:
        """Steps 1–2; None (nothing written) if the outputs were not acknowledged.  ``extra``
        (called once the outputs are acknowledged) adds role state to the checkpoint.  With
        ``background`` step 2 ends on the store's writer thread (the returned checkpoint is
        durable when it is done)."""
        if not self.settle(flush_timeout_s):
            return None
        meta = {
            "group_id": self.k.group_id,
            "topic": self.k.topic,
            "reason": reason,
            **(extra() if extra is not None else {}),
        }
        args = (engine, dict(offsets), dict(reference_offsets), dict(self.emitter.outputs))
        if background:
            return self.store.save(*args, extra=meta, background=True)
        return self.store.save(*args, extra=meta)

    def settle(self, flush_timeout_s: float) -> bool:
        """Step 1: every output produced so far acknowledged (False: roll the window back)."""
        try:
            self.emitter.settle(flush_timeout_s)
        except Exception as exc:
            self.emitter.last_failure = self.emitter.last_failure or repr(exc)
            log.error("outputs not acknowledged (%s): the window is rolled back to the last checkpoint", exc)
            return False
        return True

    @staticmethod
    def commit(consumer: BrokerConsumer, offsets: Mapping[TopicPartition, int], timeout_ms: int) -> bool:
        """Step 3.  Not fatal when it fails: the checkpoint holds the offsets and wins on the next
        assignment."""
        if not offsets:
            return True
        try:
            consumer.commit(offsets, timeout_ms)
        except Exception as exc:
            log.warning("offset commit failed (will be retried with the next checkpoint): %s", exc)
            return False
        return True
