"""The emitter: builds a chunk's output records and produces them.

Every consumed event ends in exactly one place: applied (optionally with an accepted copy),
quarantined (a quarantine copy) or dead-lettered (a dead letter with its reason and original
bytes).  A record that cannot be built or sent dead-letters its own message (reason
``output_failed``); only broker trouble rolls the window back (the loop does that at the next
checkpoint).  What every output of a chunk shares — source topic and partition, policy and model
versions — is encoded once per chunk (:class:`~stream_influence.io.records.ChunkHeaders`).
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stream_influence.config import KafkaSettings
from stream_influence.core.engine import BatchResult
from stream_influence.errors import OutputError
from stream_influence.io.broker import (
    BrokerProducer,
    BrokerTrouble,
    ConsumedRecord,
    Delivery,
    Headers,
    OutputRecord,
    RecordRefused,
    TopicPartition,
)
from stream_influence.io.records import (
    OUTPUT_FAILED,
    ChunkHeaders,
    decision_value,
    encode_key,
    fit_record,
    header_dict,
    value_proof,
)

__all__ = ["Emitter", "OutputsNotAcknowledged", "Sent"]

log = logging.getLogger(__name__)


class OutputsNotAcknowledged(Exception):
    """Outputs of the window were not acknowledged: the window must be rolled back."""


@dataclass(frozen=True, slots=True)
class Sent:
    """An output in flight, with the input message it stands for (to dead-letter it instead if
    the broker refuses this one record)."""

    delivery: Delivery
    tp: TopicPartition
    message: ConsumedRecord
    #: The event's one destination (dead letter / quarantine copy), not an audit copy.
    destination: bool


def _copy_key(event_id: str | None, tp: TopicPartition, offset: int) -> bytes:
    """Key of an audit copy: the event id, else (none, or not encodable) the source coordinates."""
    if event_id is not None:
        with contextlib.suppress(OutputError):
            return encode_key(event_id)
    return f"{tp.topic}-{tp.partition}-{offset}".encode()


class Emitter:
    """Produces outputs through one :class:`~stream_influence.io.broker.BrokerProducer` (set by the
    loop; replaced after a rollback) and keeps what is in flight until the next :meth:`settle`."""

    def __init__(self, k: KafkaSettings, count: Callable[[str, int], None]) -> None:
        self.k = k
        self._count = count  # (output kind, n) → metrics
        self.producer: BrokerProducer | None = None
        self.inflight: list[Sent] = []
        #: Broker trouble while queueing an output of this window (it is rolled back).
        self.send_error: BaseException | None = None
        self.last_failure = ""  # the latest output failure, named by source topic-partition@offset
        self.outputs: dict[str, int] = defaultdict(int)

    def count(self, kind: str, n: int) -> None:
        """``n`` more outputs of ``kind`` (the checkpoint's counters and the metrics)."""
        if n:
            self.outputs[kind] += n
            self._count(kind, n)

    # -- producing ------------------------------------------------------------------------
    def send(
        self, rec: OutputRecord, tp: TopicPartition, m: ConsumedRecord, *, destination: bool
    ) -> str | None:
        """Queue ``rec`` (cut to the producer's size limit).  Returns why *this record* cannot be
        sent (the caller dead-letters its message), or None: queued, or broker trouble that rolls
        the whole window back."""
        if self.send_error is not None:
            return None  # this window is rolled back at the next checkpoint anyway
        producer = self.producer
        if producer is None:
            self.send_error = OutputsNotAcknowledged("no producer for the outputs")
            return None
        try:
            # Cut before produce: the producer must never raise for a size we can know.
            rec = fit_record(rec, producer.max_request_size)
            delivery = producer.produce(rec)
        except BrokerTrouble as exc:
            self.last_failure = f"{rec.topic} for {tp.topic}-{tp.partition}@{m.offset}: {exc}"
            log.error("cannot produce an output (%s): the window will be rolled back", self.last_failure)
            self.send_error = exc
            return None
        except RecordRefused as exc:  # this record only: encoding, serialisation, size
            return str(exc)
        except Exception as exc:  # building it: a size that cannot fit, an unencodable header
            return f"{type(exc).__name__}: {exc}"
        self.inflight.append(Sent(delivery, tp, m, destination))
        return None

    def _send_copy(self, rec: OutputRecord, tp: TopicPartition, m: ConsumedRecord) -> None:
        """An accepted copy or a decision record: an audit, not the event's destination, so a
        refused one is logged (the event already is in its one place) rather than dead-lettered."""
        why = self.send(rec, tp, m, destination=False)
        if why is not None:
            log.error("%s-%d@%d: no copy to %s: %s", tp.topic, tp.partition, m.offset, rec.topic, why)

    def dead_letter(
        self, tp: TopicPartition, m: ConsumedRecord, reason: str, detail: str, h: ChunkHeaders
    ) -> None:
        """The input message ``m`` to the dead-letter topic (original key, value and headers)."""
        headers = h.dead_letter(m.headers, reason, detail, m.offset)
        rec = OutputRecord(self.k.dead_letter_topic, key=m.key, value=m.value, headers=headers)
        why = self.send(rec, tp, m, destination=True)
        if why is not None:  # e.g. an input header that cannot be re-encoded: keep only our own
            self.minimal_dead_letter(tp, m, f"{detail}; dead letter refused: {why}")
        self.count("dead_letter", 1)

    def minimal_dead_letter(self, tp: TopicPartition, m: ConsumedRecord, detail: str) -> None:
        """The last resort for a message whose full dead letter cannot be sent: our own headers
        only, an empty value, the original's size and SHA-256.  If even that fails, the window
        is rolled back (bounded by ``kafka.max_window_replays``): nothing is dropped silently."""
        h = ChunkHeaders(tp.topic, tp.partition)
        headers = [*h.dead_letter(None, OUTPUT_FAILED, detail, m.offset), *value_proof(m.value)]
        rec = OutputRecord(self.k.dead_letter_topic, key=None, value=b"", headers=headers)
        why = self.send(rec, tp, m, destination=True)
        if why is not None and self.send_error is None:
            self.last_failure = f"dead letter for {tp.topic}-{tp.partition}@{m.offset}: {why}"
            log.error("cannot produce even a minimal dead letter (%s)", self.last_failure)
            self.send_error = OutputError(self.last_failure)

    def quarantine_copy(
        self, tp: TopicPartition, m: ConsumedRecord, event_id: str, headers: Headers, h: ChunkHeaders
    ) -> str | None:
        """The quarantine copy of ``m`` (its value, keyed by the event id) — the event's one place.
        Returns None, or why it could not be sent: then ``m`` is dead-lettered instead."""
        try:
            rec = OutputRecord(
                self.k.quarantine_topic, key=encode_key(event_id), value=m.value, headers=headers
            )
        except OutputError as exc:
            why: str | None = str(exc)
        else:
            why = self.send(rec, tp, m, destination=True)
        if why is None:
            return None
        why = f"quarantine copy: {why}"
        log.warning("%s-%d@%d: %s; dead-lettered instead", tp.topic, tp.partition, m.offset, why)
        self.dead_letter(tp, m, OUTPUT_FAILED, why, h)
        return why

    def emit(
        self,
        tp: TopicPartition,
        msgs: list[ConsumedRecord],
        r: BatchResult,
        *,
        quarantine_copies: bool = True,
    ) -> None:
        """Produce the chunk's outputs: dead letters, quarantine copies (unless a score worker
        leaves them to the updater), then the optional accepted copies and decision records."""
        k = self.k
        topic, part = tp.topic, tp.partition
        h = ChunkHeaders(topic, part, r.policy_version, r.model_version)
        for rej in r.rejects:
            self.dead_letter(tp, msgs[rej.index], rej.reason.value, rej.detail, h)
        s = r.scores
        index = r.events.index.tolist()
        ids = r.events.ids
        failed: dict[int, str] = {}  # input index → why its quarantine copy failed
        n_q = 0
        quarantined = np.flatnonzero(r.quarantine).tolist() if quarantine_copies else []
        if quarantined:
            inf, rel, cos = s.influence.tolist(), s.relative_influence.tolist(), s.cosine_influence.tolist()
            thresholds = r.thresholds.tolist()
            for j in quarantined:
                m = msgs[index[j]]
                headers = h.quarantine(
                    m.headers,
                    m.offset,
                    reason=r.reasons[j],
                    influence=inf[j],
                    relative_influence=rel[j],
                    cosine_influence=cos[j],
                    threshold=thresholds[j],
                )
                why = self.quarantine_copy(tp, m, ids[j], headers, h)
                if why is None:
                    n_q += 1
                else:
                    failed[index[j]] = why
        self.count("quarantine", n_q)
        if k.accepted_topic:
            n = 0
            for j in np.flatnonzero(~r.quarantine).tolist():
                m = msgs[index[j]]
                rec = OutputRecord(
                    k.accepted_topic,
                    key=_copy_key(ids[j], tp, m.offset),
                    value=m.value,
                    headers=h.source(m.offset),
                )
                self._send_copy(rec, tp, m)
                n += 1
            self.count("accepted", n)
        if k.decisions_topic:
            for i, rec_d in enumerate(r.records()):
                m = msgs[i]
                if i in failed:  # the audit says where the event really went
                    rec_d = {**rec_d, "decision": "dead_letter", "reason": OUTPUT_FAILED, "detail": failed[i]}
                key = _copy_key(rec_d["id"], tp, m.offset)
                value = decision_value(rec_d, topic, part, m.offset)
                self._send_copy(OutputRecord(k.decisions_topic, key=key, value=value, headers=[]), tp, m)
            self.count("decisions", len(msgs))

    # -- acknowledgement ------------------------------------------------------------------
    def _flush(self, timeout_s: float) -> None:
        if self.producer is not None:
            self.producer.flush(timeout_s)
        elif self.inflight:
            raise OutputsNotAcknowledged("no producer for the pending outputs")

    def settle(self, timeout_s: float) -> None:
        """Flush and check every output of the window was acknowledged.  Records the broker
        refused *themselves* dead-letter their message as a minimal record and are flushed again.
        Raises :class:`OutputsNotAcknowledged` (or :class:`BrokerTrouble`) if outputs are still
        not acknowledged: the caller rolls the window back."""
        if self.send_error is not None:
            raise OutputsNotAcknowledged(f"an output could not be sent: {self.send_error!r}")
        self._flush(timeout_s)
        failed = [f for f in self.inflight if f.delivery.failed()]
        if failed and not any(f.delivery.transient for f in failed):
            # The broker refused these records themselves (too large for its limit, invalid):
            # their messages go to the dead-letter topic as a minimal record instead.
            for f in failed:
                self._refused(f)
            self.inflight = [f for f in self.inflight if not f.delivery.failed()]
            if self.send_error is not None:
                raise OutputsNotAcknowledged(f"an output could not be sent: {self.send_error!r}")
            self._flush(timeout_s)
            failed = [f for f in self.inflight if f.delivery.failed()]
        if failed:
            f = failed[0]
            self.last_failure = (
                f"{f.delivery.record.topic} for {f.tp.topic}-{f.tp.partition}@{f.message.offset}: "
                f"{f.delivery.error!r}"
            )
            raise OutputsNotAcknowledged(f"{len(failed)} output message(s) failed, first {self.last_failure}")
        self.inflight.clear()

    def _refused(self, f: Sent) -> None:
        """The broker refused one output record (not broker trouble): dead-letter its message."""
        where = f"{f.tp.topic}-{f.tp.partition}@{f.message.offset}"
        why = f"{f.delivery.record.topic} refused the record: {f.delivery.error!r}"
        if not f.destination:
            log.error("%s: no copy to %s", where, why)
            return
        log.warning("%s: %s; dead-lettered instead", where, why)
        was = header_dict(f.delivery.record.headers).get("reason", "quarantine")
        self.minimal_dead_letter(f.tp, f.message, f"{was}: {why}")

    def discard(self) -> None:
        """Forget the window's outputs and the producer (a rollback): the idempotent producer
        cannot survive a broker that lost its state; a fresh one always can."""
        self.inflight.clear()
        self.send_error = None
        if self.producer is not None:
            with contextlib.suppress(Exception):
                self.producer.close(0)
        self.producer = None
