"""Kafka document input: a consumer-group member feeding the processor, at-least-once.

:class:`KafkaDocumentSource` has the 0MQ source's interface (``start``, ``get(timeout)``,
``close``, ``stats``, ``ready``, ``last_error``): a receive thread polls a confluent-kafka
consumer (``enable.auto.commit=false``, cooperative-sticky assignment), decodes each value
in bluesky-kafka's format (:func:`~xasflow.adapters.kafka_bus.decode_counted`) and
puts it on a bounded queue; when the queue is full it stops polling (Kafka keeps the rest).

Commit rule (at-least-once). The processing thread calls :meth:`mark_processed` after each
turn; which offsets that makes committable (never past the start of a run still open) is
worked out per partition in :mod:`xasflow.adapters.kafka_offsets`. Every ``commit_interval_s``
a committer thread takes that snapshot, makes the results durable (``durable(timeout)``:
the daemon flushes the store and the Kafka publisher) and only then hands the offsets to
the receive thread, which commits them (asynchronously, the result counted in ``commits`` /
``commit_failures``; synchronously on revoke and at the end). After a crash the successor
gets the uncommitted documents again; the store skips rows whose ``seq_num`` it already
holds, so the catalog holds every result once.

Rebalances. A revoked partition is committed the same way first (inside the callback);
its queued documents are dropped here (``dropped_revoked``: they go to the new owner), and
each run open on it is handed over: the new owner analyses the run from its start (the
commit never passed it) and this daemon closes its partial copy (exit_status "abort",
reason ``revoked: ...``, counted in ``runs_handed_over``) via :meth:`abandoned`.
Lost partitions (session timeout) are handed over without a commit.

The committer thread, the commits and the rebalance callbacks are
:class:`~xasflow.adapters.kafka_commits.KafkaCommits`'s, a mixin of the source.

A document fetched but left unqueued by a close (it waited for room) is ``released_on_close``,
not ``dropped_on_close`` (always 0): never taken, never committed, the group delivers it again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xasflow.adapters.kafka_bus import KafkaInputSettings, decode_counted
from xasflow.adapters.kafka_commits import KafkaCommits
from xasflow.adapters.kafka_log import OutageLog
from xasflow.adapters.kafka_offsets import (
    INPUT_COUNTERS,
    TP,
    PartitionOffsets,
    broker_lag,
)

__all__ = ["KafkaDocumentSource", "KafkaInputSettings"]

logger = logging.getLogger(__name__)

_DRAIN = 256  # messages taken at once after a poll


@dataclass
class _Item:
    name: str | None  # None: an undecodable message, taken (skipped) in its place in order
    doc: dict[str, Any]
    tp: TP
    offset: int
    gen: int


class KafkaDocumentSource(KafkaCommits):
    """Receive bluesky documents from Kafka topics as one member of a consumer group.

    ``durable(timeout) -> bool`` makes everything handed to the sinks so far durable (store
    and publisher flushed); offsets are committed only after it returned True. ``hold() ->
    str | None`` says why no offset may be committed any more (results the store refused:
    committing past them would lose them for good; a restart has them redelivered).
    """

    def __init__(
        self,
        settings: KafkaInputSettings,
        durable: Callable[[float], bool] | None = None,
        hold: Callable[[], str | None] | None = None,
    ) -> None:
        self.settings = settings
        self.durable = durable if durable is not None else (lambda timeout: True)
        self.hold = hold
        self._held_logged = False
        self._log = OutageLog()  # librdkafka's log: an outage in a bounded number of lines
        self._queue: queue.Queue[_Item] = queue.Queue(settings.queue_size)
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(INPUT_COUNTERS, 0)
        self._offsets = PartitionOffsets()  # guarded by _lock
        self._pending: tuple[dict[TP, int], dict[TP, int]] | None = None  # offsets, gens
        self._consumer: Any = None
        self._stop = threading.Event()
        self._setup_done = threading.Event()
        self._setup_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._committer: threading.Thread | None = None
        self._closed = False
        self._finished = False
        self._ended = False  # the receive thread no longer uses the consumer (under _lock)
        self._leave_later: float | None = None  # finish()'s timeout, left to that thread
        #: Set once the consumer has subscribed (partitions are assigned later).
        self.ready = threading.Event()
        #: Text of the most recent decode, consumer or commit error.
        self.last_error: str | None = None
        self.last_document_at: float | None = None  # monotonic: the last document decoded

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Create the consumer and subscribe; raise RuntimeError/TimeoutError if that fails.

        Returns or raises within ``timeout`` plus the few milliseconds of a thread start and
        of taking a lock: a failed start does not wait for the receive thread (a consumer it
        makes after all is closed by that thread itself, see :meth:`finish`).
        """
        if self._thread is not None or self._closed:
            raise RuntimeError("KafkaDocumentSource can be started once")
        self._thread = threading.Thread(target=self._run, name="xasflow-kafka-in", daemon=True)
        self._thread.start()
        if not self._setup_done.wait(timeout):
            self.close(timeout=0)  # no join: the thread may be making the consumer still
            self.finish(0)  # a consumer made after all is closed, by the receive thread
            raise TimeoutError(f"Kafka consumer not subscribed within {timeout}s")
        if self._setup_error is not None:
            err = self._setup_error
            self.close(timeout=0)  # the thread has ended, or is about to: it holds nothing
            self.finish(0)
            raise RuntimeError(f"Kafka consumer could not subscribe: {err}") from err
        self._committer = threading.Thread(
            target=self._commit_loop, name="xasflow-kafka-commit", daemon=True
        )
        self._committer.start()

    def close(self, timeout: float = 5.0) -> bool:
        """Stop receiving and join the threads; queued documents stay readable with ``get``.

        Call :meth:`finish` once they are processed to commit them and leave the group.
        """
        self._stop.set()
        self._closed = True
        joined = True
        for thread in (self._thread, self._committer):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)
                joined = joined and not thread.is_alive()
        return joined

    def finish(self, timeout: float = 10.0) -> None:
        """After :meth:`close` and the processing: commit what is durable, leave the group.

        librdkafka's consumer is for one thread at a time: a receive thread still inside it
        (``close`` gave up joining it, e.g. a rebalance callback waiting for durability) is
        waited for up to ``timeout``; if it is still there, it makes the last commit and
        leaves the group itself on its way out (:meth:`_leave`), never this thread beside it.
        """
        if self._finished:
            return
        self._finished = True
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and timeout > 0:
            thread.join(timeout)
        with self._lock:  # the receive thread reads _leave_later under it as it ends
            later = thread is not None and thread.is_alive() and not self._ended
            self._leave_later = timeout if later else None
        if later:
            logger.warning("Kafka receive thread still busy: it leaves the group when done")
        elif self._consumer is not None:
            self._leave(self._consumer, timeout)

    def _leave(self, consumer: Any, timeout: float) -> None:
        """The last commit of what is durable (none if ``timeout`` is 0), then leave the group."""
        try:
            offsets = self.committable() if timeout > 0 else {}
            if offsets and self._may_commit(timeout):
                with self._lock:
                    gens = self._offsets.gens(offsets)
                self._commit(consumer, offsets, gens)
        except Exception as exc:
            logger.warning("the last Kafka commit: %s", exc)
        try:
            consumer.close()  # leaves the group: the others take the partitions at once
        except Exception as exc:
            logger.warning("closing the Kafka consumer: %s", exc)

    @property
    def closed(self) -> bool:
        """True once ``close()`` has been called."""
        return self._closed

    @property
    def address(self) -> str:
        """Bootstrap servers and topics, for logs."""
        return f"kafka://{self.settings.bootstrap_servers}/{','.join(self.settings.topics)}"

    # ------------------------------------------------------------------ processing thread

    def get(self, timeout: float | None = None) -> tuple[str, dict[str, Any]] | None:
        """Next ``(name, doc)`` of a partition still assigned here, or None after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            wait = self.settings.poll_interval_s
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                if (deadline is not None and time.monotonic() >= deadline) or self._closed:
                    return None
                continue
            with self._lock:
                if not self._offsets.take(item.tp, item.gen, item.offset, item.name, item.doc):
                    self._counts["dropped_revoked"] += 1  # the partition's new owner has it
                    continue
                if item.name is None:  # processed once what came before it is: not held
                    continue
                self._counts["delivered"] += 1
            return item.name, item.doc

    def mark_processed(self) -> None:
        """Everything taken so far has gone to the sinks (called after each processing turn).
        Not counted after :meth:`finish`: the store closes then, and refuses their results."""
        with self._lock:
            if not self._finished:  # a late commit (the receive thread's) stops before them
                self._offsets.mark_processed()

    def abandoned(self) -> list[tuple[str, str]]:
        """Runs handed over since the last call, ``(uid, reason)``: their partition went to
        another group member, or came back to this one (which then replays them)."""
        with self._lock:
            return self._offsets.abandoned()

    def runs_ended(self, uids: list[str]) -> None:
        """Runs the processor closed without their stop (run timeout) or whose start opened
        no run (a probe, a refused start): they no longer hold their partition's commit at
        their start once the turn is processed."""
        with self._lock:
            self._offsets.runs_ended(uids)

    # ------------------------------------------------------------------ reading

    def stats(self) -> dict[str, int]:
        """Counters, ``queue_depth``, ``assigned_partitions`` and ``lag_total``."""
        with self._lock:
            snap = dict(self._counts)
            snap["assigned_partitions"] = len(self._offsets.gen)
            snap["lag_total"] = sum(self._offsets.lag.values())
        snap["queue_depth"] = self._queue.qsize()
        return snap

    def lag(self) -> dict[TP, int]:
        """Per assigned partition: messages on the broker not yet processed here."""
        with self._lock:
            return dict(self._offsets.lag)

    def health(self) -> dict[str, Any]:
        """The ``/health`` view: settings, assignment, committed offsets and lag."""
        with self._lock:
            parts = self._offsets.view()
        return {
            "bootstrap_servers": self.settings.bootstrap_servers,
            "topics": list(self.settings.topics),
            "group_id": self.settings.group_id,
            "partitions": parts,
            "commit_hold": self.commit_hold(),
        }

    # ------------------------------------------------------------------ receive thread

    def _run(self) -> None:
        from confluent_kafka import Consumer

        try:
            conf = self.settings.consumer_config()
            callbacks = {"on_commit": self._on_commit, "error_cb": self._error}
            consumer = Consumer({"logger": self._log, **conf, **callbacks})
            consumer.subscribe(
                list(self.settings.topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        except Exception as exc:
            self._setup_error = exc
            self._setup_done.set()
            return
        self._consumer = consumer
        self.ready.set()
        self._setup_done.set()
        next_lag = 0.0
        try:
            while not self._stop.is_set():
                try:
                    self._serve_commit(consumer)
                    self._log.tick()
                    msg = consumer.poll(self.settings.poll_interval_s)
                    if msg is not None:
                        self._handle(msg)
                        # what is fetched already, in one call: every poll() hands the GIL
                        # back and waits for it again, behind the processing thread
                        for more in consumer.consume(_DRAIN, 0):
                            self._handle(more)
                    if time.monotonic() >= next_lag:
                        next_lag = time.monotonic() + 1.0
                        self._update_lag(consumer)
                except Exception as exc:  # keep receiving whatever one message did
                    self._count("consumer_errors")
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    logger.exception("Kafka receive loop")
            self._serve_commit(consumer)
        finally:
            with self._lock:  # from here on finish() uses the consumer, unless it came first
                self._ended, later = True, self._leave_later
            if later is not None:
                self._leave(consumer, later)

    def _handle(self, msg: Any) -> None:
        err = msg.error()
        if err is not None:
            from confluent_kafka import KafkaError

            if err.code() == KafkaError._PARTITION_EOF:  # a user-set enable.partition.eof:
                return  # the end of what there is to read, not a fault
            self._count("consumer_errors")
            self.last_error = str(err)
            logger.warning("Kafka consumer error: %s", err)
            return
        name, doc, counts, error = decode_counted(msg.value())
        tp = (msg.topic(), msg.partition())
        with self._lock:
            for key, n in counts.items():
                self._counts[key] = self._counts.get(key, 0) + n
            gen = self._offsets.gen.get(tp, -1)
        if name is not None:
            self.last_document_at = time.monotonic()  # the input hears documents (/health)
        if error is not None:
            self.last_error = error
            logger.warning("undecodable Kafka message %s[%s]@%s: %s", *tp, msg.offset(), error)
        # an undecodable message is queued too, so that its offset is processed (and
        # committed, and not lag) once everything before it is, never ahead of them
        item = _Item(name, doc, tp, msg.offset(), gen)
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=self.settings.poll_interval_s)
                if name is not None:
                    self._count("enqueued")
                return
            except queue.Full:
                self._serve_commit(self._consumer)  # keep committing while we wait
        if name is not None:  # not committed (never taken): the group delivers it again
            self._count("released_on_close")

    def _error(self, err: Any) -> None:
        """librdkafka's client errors (a broker unreachable: it keeps reconnecting), served
        in ``poll``: every one counted in ``consumer_errors`` (its log lines: :attr:`_log`);
        librdkafka itself may hold back an error identical to its last for 30 s."""
        self._count("consumer_errors")
        self.last_error = f"consumer: {err}"
        logger.log(logging.ERROR if err.fatal() else logging.DEBUG, "Kafka consumer: %s", err)

    def _update_lag(self, consumer: Any) -> None:
        with self._lock:
            tps, starts = list(self._offsets.gen), dict(self._offsets.start)
        earliest = self.settings.auto_offset_reset == "earliest"
        lag = broker_lag(consumer, tps, self._processed_at, starts, earliest)
        with self._lock:
            self._offsets.set_lag(lag)

    def _processed_at(self, tp: TP) -> int | None:
        with self._lock:
            return self._offsets.processed.get(tp)

    def _serve_commit(self, consumer: Any) -> None:
        """Commit the offsets the committer thread handed over, if any (receive thread)."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and consumer is not None:
            self._commit(consumer, *pending, sync=False)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n
