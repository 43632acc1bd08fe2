"""When :class:`~xasflow.adapters.kafka_input.KafkaDocumentSource` commits its offsets, and
what it does at a rebalance: a mixin only it uses.

The committer thread (:meth:`KafkaCommits._commit_loop`) takes the committable offsets
every ``commit_interval_s``, makes what was handed to the sinks durable and hands them to
the receive thread (its ``_serve_commit``), which commits them asynchronously; the report
comes back to :meth:`KafkaCommits._on_commit`. At a revoke the partitions' offsets are
committed the same way (synchronously, inside the callback) and their runs handed over; a
lost partition's runs are handed over without a commit. The rule itself (never past the
start of a run still open) is :mod:`xasflow.adapters.kafka_offsets`'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xasflow.adapters.kafka_bus import KafkaInputSettings
from xasflow.adapters.kafka_offsets import TP, PartitionOffsets, committed_offsets

__all__ = ["KafkaCommits"]

logger = logging.getLogger("xasflow.adapters.kafka_input")


class KafkaCommits:
    """Offset commits and rebalance callbacks of ``KafkaDocumentSource`` (its state)."""

    settings: KafkaInputSettings
    durable: Callable[[float], bool]
    hold: Callable[[], str | None] | None
    last_error: str | None
    _held_logged: bool
    _lock: threading.Lock
    _counts: dict[str, int]
    _offsets: PartitionOffsets  # guarded by _lock
    _pending: tuple[dict[TP, int], dict[TP, int]] | None  # offsets, gens
    _stop: threading.Event

    if TYPE_CHECKING:

        def _count(self, name: str, n: int = 1) -> None: ...

    def committable(self, tps: list[TP] | None = None) -> dict[TP, int]:
        """Offsets that may be committed once the results are durable (see the module doc)."""
        with self._lock:
            return self._offsets.committable(tps)

    def _commit_loop(self) -> None:
        """Committer thread: snapshot, make durable, hand to the receive thread."""
        while not self._stop.wait(self.settings.commit_interval_s):
            try:
                offsets = self.committable()
                if not offsets:
                    continue
                with self._lock:
                    gens = self._offsets.gens(offsets)
                if not self._may_commit(self.settings.flush_timeout_s):
                    continue
                with self._lock:
                    self._pending = (offsets, gens)
            except Exception:
                logger.exception("Kafka commit step")

    def commit_hold(self) -> str | None:
        """Why no offset may be committed (``hold``'s reason; None while commits go on)."""
        return self.hold() if self.hold is not None else None

    def _may_commit(self, timeout: float) -> bool:
        """Whether offsets may be committed now: nothing holds them, and what was handed to
        the sinks is durable (counted in ``commits_held`` / ``flush_timeouts`` when not).

        The hold is asked again once the results are durable, or not: making them so can be
        what loses some (a store write that fails for good; the store's flush is then False),
        and the commit would then go past them (no later commit is tried for offsets already
        committed, so nothing held it); a loss the hold names is counted held, not as a
        flush timeout."""
        if self._held():
            return False
        durable = self.durable(timeout)
        if self._held():
            return False
        if not durable:
            self._count("flush_timeouts")
        return durable

    def _held(self) -> bool:
        """Whether something holds the commits (logged once, counted each time)."""
        reason = self.commit_hold()
        if reason is None:
            return False
        if not self._held_logged:
            logger.error("Kafka offset commits held from now on: %s", reason)
            self._held_logged = True
        self._count("commits_held")
        return True

    def _commit(
        self, consumer: Any, offsets: dict[TP, int], gens: dict[TP, int], sync: bool = True
    ) -> None:
        """Commit the offsets of partitions still assigned in the same generation.

        Asynchronous from the receive loop (a synchronous commit would stall receiving for a
        broker round trip; the result comes to :meth:`_on_commit`), synchronous on revoke
        and at the end, where the partitions are about to go.
        """
        from confluent_kafka import KafkaException, TopicPartition

        with self._lock:
            mine = self._offsets.still_assigned(offsets, gens)
        if not mine:
            return
        parts = [TopicPartition(t, p, o) for (t, p), o in mine.items()]
        try:
            result = consumer.commit(offsets=parts, asynchronous=not sync)
        except KafkaException as exc:
            self._commit_done(exc, [])
            return
        if sync:
            self._commit_done(None, result or [])

    def _on_commit(self, err: Any, partitions: list[Any]) -> None:
        """librdkafka's report of an asynchronous commit (called inside ``poll``)."""
        self._commit_done(err, partitions)

    def _commit_done(self, err: Any, partitions: list[Any]) -> None:
        failed = err is not None or any(tp.error is not None for tp in partitions)
        with self._lock:
            self._counts["commit_failures" if failed else "commits"] += 1
            for tp in partitions:
                if tp.error is None and err is None:
                    self._offsets.committed_at((tp.topic, tp.partition), tp.offset)
        if failed:
            bad = err if err is not None else next(tp.error for tp in partitions if tp.error)
            self.last_error = f"commit: {bad}"
            logger.warning("Kafka commit failed: %s", bad)

    # ------------------------------------------------------------------ rebalance callbacks

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        starts = committed_offsets(consumer, partitions, self.settings.flush_timeout_s)
        with self._lock:
            self._counts["rebalances"] += 1
            self._counts["partitions_assigned"] += len(partitions)
            self._offsets.assign([(p.topic, p.partition) for p in partitions], starts)
        if partitions:
            logger.info(
                "Kafka partitions assigned: %s", [f"{p.topic}[{p.partition}]" for p in partitions]
            )

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        try:
            offsets = self.committable(tps) if tps else {}
            if offsets:
                with self._lock:
                    gens = self._offsets.gens(offsets)
                if self._may_commit(self.settings.flush_timeout_s):
                    self._commit(consumer, offsets, gens)
        except Exception as exc:  # the partitions go whatever happened: hand their runs over
            self._count("consumer_errors")
            self.last_error = f"revoke: {type(exc).__name__}: {exc}"
            logger.exception("Kafka commit at revoke")
        finally:
            self._hand_over(tps, "revoked", "partitions_revoked")

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        self._hand_over([(p.topic, p.partition) for p in partitions], "lost", "partitions_lost")

    def _hand_over(self, tps: list[TP], how: str, counter: str) -> None:
        with self._lock:
            self._counts[counter] += len(tps)
            n = self._offsets.hand_over(tps, how, self.settings.group_id)
            self._counts["runs_handed_over"] += n
        if tps:
            logger.info("Kafka partitions %s: %s", how, [f"{t}[{p}]" for t, p in tps])
