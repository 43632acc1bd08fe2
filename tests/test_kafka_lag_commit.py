"""Lag, commits and errors of the Kafka input at the edges: an idle partition committed to
its end, an undecodable last message, partition-end events, analysis documents the output
broker never acknowledged.

Against a real Kafka-protocol broker (``tests/kafka_broker.py``); each case failed before
its fix (idle lag: the partition's length; bad last message: lag 1 and a commit one short
for good; partition ends: counted as consumer errors; lost output: offsets committed past
documents the bus never got).
"""

from __future__ import annotations

import logging
import time
import uuid

import pytest

pytest.importorskip("confluent_kafka", reason="the kafka extra is not installed")

from helpers import free_port, wait_for
from kafka_broker import CONSUMER, Broker

from xasflow.adapters.kafka_bus import (
    KafkaDocumentPublisher,
    KafkaInputSettings,
    KafkaOutputSettings,
    encode_kafka_value,
)
from xasflow.adapters.kafka_input import KafkaDocumentSource

LOG = logging.getLogger("test_review_kafka.librdkafka")


def _produce(broker: Broker, topic: str, values: list[bytes]) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 1, "logger": LOG})
    for v in values:
        p.produce(topic, v, b"k", partition=0)
    assert p.flush(10) == 0


def _run_docs(uid: str) -> list[bytes]:
    return [
        encode_kafka_value("start", {"uid": uid, "time": time.time()}),
        encode_kafka_value("stop", {"uid": uid + "-s", "run_start": uid, "time": time.time()}),
    ]


def _source(broker: Broker, topic: str, group: str, **consumer: object) -> KafkaDocumentSource:
    return KafkaDocumentSource(
        KafkaInputSettings(
            bootstrap_servers=broker.bootstrap,
            topics=(topic,),
            group_id=group,
            consumer={"logger": LOG, **CONSUMER, **consumer},
        )
    )


def test_lag_of_an_idle_partition_committed_to_its_end_is_zero(broker: Broker) -> None:
    """A member that takes over (or restarts on) a partition whose committed offset is its
    high watermark has nothing to do: ``xasflow_kafka_consumer_lag`` is 0. The consumer's
    position stays invalid (-1001) until a message is returned, and counting from 0 made the
    partition's whole length its lag for as long as it stayed idle (a lag alert firing on a
    topic with a long history)."""
    from confluent_kafka import Consumer, TopicPartition

    topic, group = f"rv-lag-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    broker.create_topic(topic, 1)
    _produce(broker, topic, _run_docs("A") + _run_docs("B"))  # 4 messages, all done before
    prev = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "logger": LOG})
    prev.commit(offsets=[TopicPartition(topic, 0, 4)], asynchronous=False)  # a predecessor's
    prev.close()
    source = _source(broker, topic, group)
    source.start()
    try:
        wait_for(lambda: source.lag() == {(topic, 0): 0}, "the idle partition's lag, 0", 30)
        assert source.get(0.5) is None  # nothing is redelivered: nothing is pending
    finally:
        source.close()
        source.finish(0)


def test_a_trailing_undecodable_message_leaves_no_lag(broker: Broker) -> None:
    """An undecodable message is consumed (counted in decode_errors, never analysable); once
    everything before it is processed the partition has nothing left to do: no lag, and
    the commit past it. Before, it was never taken: lag 1 for good, and a commit one short
    (every restart read it again)."""
    topic, group = f"rv-bad-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    broker.create_topic(topic, 1)
    _produce(broker, topic, [*_run_docs("C"), b"\xc1 not msgpack"])
    source = _source(broker, topic, group)
    source.start()
    try:
        got: list[object] = []

        def read() -> bool:
            got.append(source.get(0.1))
            return len([g for g in got if g]) >= 2 and source.stats()["decode_errors"] == 1

        wait_for(read, "the run's two documents and the bad value", 60)
        assert source.get(0.5) is None  # the bad value is passed over, never returned
        source.mark_processed()  # the processing thread's turn is done

        def settled() -> bool:
            part = source.health()["partitions"][f"{topic}[0]"]
            return source.lag() == {(topic, 0): 0} and part["committed"] == 3

        wait_for(settled, "no lag, and the commit past the bad value", 30)
        assert source.committable() == {}
        assert source.stats()["delivered"] == 2 and source.stats()["enqueued"] == 2
    finally:
        source.close()
        source.finish(0)


def test_partition_eof_events_are_not_consumer_errors(broker: Broker) -> None:
    """``enable.partition.eof`` set among the consumer settings (they win over the input's
    own) makes librdkafka report each partition's end as a message whose error is
    ``_PARTITION_EOF``: the end of what there is to read, not a fault. Before, each one was
    counted in ``consumer_errors``, logged as a warning and shown as ``last_error``."""
    topic, group = f"rv-eof-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    broker.create_topic(topic, 1)
    _produce(broker, topic, _run_docs("E"))
    source = _source(broker, topic, group, **{"enable.partition.eof": True})
    source.start()
    try:
        got: list[object] = []

        def read() -> bool:
            got.append(source.get(0.1))
            return len([g for g in got if g]) >= 2

        wait_for(read, "the run's two documents", 60)
        source.mark_processed()
        # the end of the partition was reached right after them: by the time the commit
        # has gone past both, its event has long been served
        wait_for(lambda: source.health()["partitions"][f"{topic}[0]"]["committed"] == 2, "", 30)
        assert source.get(0.5) is None
        stats = source.stats()
        assert (stats["consumer_errors"], source.last_error) == (0, None)
        assert stats["received"] == 2 and stats["delivered"] == 2
    finally:
        source.close()
        source.finish(0)


def test_publisher_flush_is_false_once_a_document_was_not_acknowledged() -> None:
    """``Daemon._durable`` commits the input's offsets only when ``flush()`` says every
    produced document was acknowledged. A document whose delivery failed (here:
    message.timeout.ms expired, no broker) leaves librdkafka's queue too: flush must still
    say False, and go on saying it (``undelivered``)."""
    pub = KafkaDocumentPublisher(
        KafkaOutputSettings(
            bootstrap_servers=f"127.0.0.1:{free_port()}",  # nobody listens
            topic="rv-out",
            producer={"message.timeout.ms": 300, "logger": LOG},
        )
    )
    pub("start", {"uid": "R", "raw_uid": "R", "time": 0.0})
    wait_for(lambda: pub.flush(0.2) is False and pub.undelivered == 1, "the delivery failed", 30)
    assert pub.stats()["delivered"] == 0
    assert pub.flush(1.0) is False  # the queue is empty now; the loss is not forgotten
