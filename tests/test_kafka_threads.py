"""The Kafka input's consumer is used by one thread at a time, whatever the shutdown does.

librdkafka's consumer handle (confluent-kafka's ``Consumer``) is not thread-safe: a
``close()`` from one thread while another is inside ``poll()`` frees what the poll uses. The
receive thread owns it; these cases make that thread slow (a poll that outlasts ``close``'s
join, as a rebalance callback waiting up to ``flush_timeout_s`` for durability does; a
consumer slow to be created) against a real Kafka-protocol broker (``tests/kafka_broker.py``),
with the consumer wrapped so that a call from a second thread while one is inside is
recorded and refused instead of crashing the process.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import pytest

pytest.importorskip("confluent_kafka", reason="the kafka extra is not installed")

import confluent_kafka
from helpers import wait_for
from kafka_broker import CONSUMER, Broker

from xasflow.adapters.kafka_bus import KafkaInputSettings, encode_kafka_value
from xasflow.adapters.kafka_input import KafkaDocumentSource

LOG = logging.getLogger("test_kafka_threads.librdkafka")
RealConsumer = confluent_kafka.Consumer


class WatchedConsumer(RealConsumer):  # type: ignore[misc,valid-type]
    """A real consumer that records (in ``overlaps``) and refuses any call made while another
    thread is inside one, and can stall inside ``poll`` (``stall_s``, once)."""

    made: ClassVar[list[WatchedConsumer]] = []
    create_delay_s = 0.0

    def __init__(self, conf: dict[str, Any]) -> None:
        time.sleep(self.create_delay_s)
        super().__init__(conf)
        self.overlaps: list[str] = []
        self.closed_by: str | None = None
        self.stall_s = 0.0
        self.stalling = threading.Event()
        self.release: threading.Event | None = None  # a stall that ends when it is set
        self._guard = threading.Lock()
        self._owner: threading.Thread | None = None
        self._depth = 0  # rebalance callbacks call back in from inside poll()
        WatchedConsumer.made.append(self)

    @contextmanager
    def _use(self, what: str) -> Iterator[None]:
        me = threading.current_thread()
        with self._guard:
            if self._owner is not None and self._owner is not me:
                self.overlaps.append(f"{what} from {me.name} inside {self._owner.name}")
                raise RuntimeError(f"{what}: the consumer is in use by another thread")
            self._owner, self._depth = me, self._depth + 1
        try:
            yield
        finally:
            with self._guard:
                self._depth -= 1
                if not self._depth:
                    self._owner = None

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        with self._use("poll"):
            msg = super().poll(*args, **kwargs)
            if self.stall_s:
                stall, self.stall_s = self.stall_s, 0.0
                self.stalling.set()
                if self.release is not None:
                    assert self.release.wait(60)
                else:
                    time.sleep(stall)
            return msg

    def consume(self, *args: Any, **kwargs: Any) -> Any:
        with self._use("consume"):
            return super().consume(*args, **kwargs)

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        with self._use("commit"):
            return super().commit(*args, **kwargs)

    def committed(self, *args: Any, **kwargs: Any) -> Any:
        with self._use("committed"):
            return super().committed(*args, **kwargs)

    def position(self, *args: Any, **kwargs: Any) -> Any:
        with self._use("position"):
            return super().position(*args, **kwargs)

    def get_watermark_offsets(self, *args: Any, **kwargs: Any) -> Any:
        with self._use("get_watermark_offsets"):
            return super().get_watermark_offsets(*args, **kwargs)

    def close(self, *args: Any, **kwargs: Any) -> Any:
        with self._use("close"):
            super().close(*args, **kwargs)
            self.closed_by = threading.current_thread().name


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[WatchedConsumer]]:
    """The consumers the input creates from now on, watched; any left open is closed at the
    end (its threads are gone by then), else its teardown at exit waits for the broker."""
    WatchedConsumer.made, WatchedConsumer.create_delay_s = [], 0.0
    monkeypatch.setattr(confluent_kafka, "Consumer", WatchedConsumer)
    yield WatchedConsumer.made
    for consumer in WatchedConsumer.made:
        if consumer.closed_by is None:
            RealConsumer.close(consumer)


def _committed(broker: Broker, topic: str, group: str) -> int:
    probe = RealConsumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "logger": LOG})
    try:
        tp = confluent_kafka.TopicPartition(topic, 0)
        return int(probe.committed([tp], timeout=10)[0].offset)
    finally:
        probe.close()


def _runs_source(broker: Broker, uids: tuple[str, ...]) -> tuple[KafkaDocumentSource, str, str]:
    """A started source over a new one-partition topic holding a start and a stop for each
    run in ``uids``, committing only at its end; with the topic and the group."""
    topic, group = f"th-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    broker.create_topic(topic, 1)
    producer = confluent_kafka.Producer({"bootstrap.servers": broker.bootstrap, "logger": LOG})
    for uid in uids:
        for name, doc in (("start", {"uid": uid, "time": 0.0}), ("stop", {"run_start": uid})):
            producer.produce(topic, encode_kafka_value(name, doc), uid.encode(), partition=0)
    assert producer.flush(10) == 0
    settings = KafkaInputSettings(
        bootstrap_servers=broker.bootstrap,
        topics=(topic,),
        group_id=group,
        commit_interval_s=600.0,  # no commit but the last one
        consumer={"logger": LOG, **CONSUMER},
    )
    source = KafkaDocumentSource(settings)
    source.start()
    return source, topic, group


def test_finish_never_uses_the_consumer_while_the_receive_thread_is_inside_it(
    broker: Broker, watched: list[WatchedConsumer]
) -> None:
    """``close()`` gives up joining a receive thread stuck inside ``poll``; ``finish()`` then
    must neither commit nor close the consumer from its own thread (before: it did both,
    beside the poll). The receive thread makes the last commit of what was processed and
    leaves the group itself once it gets out."""
    source, topic, group = _runs_source(broker, ("T",))
    got: list[object] = []
    wait_for(lambda: got.append(source.get(0.1)) or len([g for g in got if g]) == 2, "2 docs", 60)
    source.mark_processed()
    (consumer,) = watched
    consumer.stall_s = 3.0  # e.g. a revoke waiting for the store to flush
    assert consumer.stalling.wait(10)
    assert source.close(timeout=0.3) is False  # the receive thread is still inside poll()
    began = time.monotonic()
    source.finish(timeout=0.5)
    assert time.monotonic() - began < 2.0  # left to the receive thread, not waited for
    wait_for(lambda: consumer.closed_by or consumer.overlaps, "the consumer closed", 15)
    assert consumer.overlaps == []
    assert consumer.closed_by == "xasflow-kafka-in"
    assert _committed(broker, topic, group) == 2  # the last commit was still made


def test_what_is_processed_after_finish_is_never_committed(
    broker: Broker, watched: list[WatchedConsumer]
) -> None:
    """``finish()`` left the last commit to a receive thread stuck inside ``poll``, and the
    daemon closes its store next: documents the processing thread still marks processed
    after that (its join timed out) have results the closed store refused (counted
    ``unstored``, which holds no commit), so the receive thread's commit must stop at what
    was processed when ``finish()`` came. Before, it committed them (offset 4, not 2)."""
    source, topic, group = _runs_source(broker, ("T", "U"))
    wait_for(lambda: source.stats()["enqueued"] == 4, "4 documents queued", 60)
    assert source.get(1.0) is not None and source.get(1.0) is not None  # run T
    source.mark_processed()
    (consumer,) = watched
    consumer.release, consumer.stall_s = threading.Event(), 1.0
    assert consumer.stalling.wait(10)
    assert source.close(timeout=0.3) is False  # the receive thread is still inside poll()
    source.finish(timeout=0.5)  # left to the receive thread; the store closes now
    assert source.get(0.0) is not None and source.get(0.0) is not None  # run U, after it
    source.mark_processed()
    consumer.release.set()
    wait_for(lambda: consumer.closed_by or consumer.overlaps, "the consumer closed", 15)
    assert consumer.overlaps == [] and consumer.closed_by == "xasflow-kafka-in"
    assert _committed(broker, topic, group) == 2  # run T only


def _slow_consumer_source(broker: Broker, create_delay_s: float) -> KafkaDocumentSource:
    """An input on a fresh one-partition topic whose consumer takes this long to be made."""
    topic = f"th-{uuid.uuid4().hex[:6]}"
    broker.create_topic(topic, 1)
    WatchedConsumer.create_delay_s = create_delay_s
    settings = KafkaInputSettings(
        bootstrap_servers=broker.bootstrap,
        topics=(topic,),
        group_id=uuid.uuid4().hex,
        consumer={"logger": LOG, **CONSUMER},
    )
    return KafkaDocumentSource(settings)


def test_a_start_that_times_out_still_closes_its_consumer(
    broker: Broker, watched: list[WatchedConsumer]
) -> None:
    """A consumer created after ``start()`` gave up waiting for it joins the group all the
    same: it must be closed (by whichever thread has it then, one at a time), not left a
    member that holds partitions it never reads (before: nobody closed it)."""
    source = _slow_consumer_source(broker, create_delay_s=1.0)
    with pytest.raises(TimeoutError):
        source.start(timeout=0.2)
    consumer = wait_for(lambda: watched and watched[0], "the consumer created", 30)
    wait_for(lambda: consumer.closed_by, "the late consumer closed", 10)
    assert consumer.overlaps == []


def test_a_start_that_times_out_returns_within_its_timeout(
    broker: Broker, watched: list[WatchedConsumer]
) -> None:
    """``start(timeout=0.3)`` while the consumer takes 4 s to be created. Before: it raised
    only after ``close()`` had joined the receive thread for up to 5 s more (about 4 s here,
    5.3 s with a slower consumer). Now it raises within its timeout (plus a bounded 0.5 s
    here), and the receive thread closes the late consumer itself, one thread at a time."""
    source = _slow_consumer_source(broker, create_delay_s=4.0)
    began = time.monotonic()
    with pytest.raises(TimeoutError, match=r"within 0\.3s"):
        source.start(timeout=0.3)
    took = time.monotonic() - began
    assert 0.3 <= took < 0.8, f"start(timeout=0.3) took {took:.2f} s"
    consumer = wait_for(lambda: watched and watched[0], "the consumer created", 30)
    wait_for(lambda: consumer.closed_by, "the late consumer closed", 15)
    assert consumer.closed_by == "xasflow-kafka-in" and consumer.overlaps == []
