"""The Kafka transport alone, for ``bench/kafka.py``: the broker's own ceiling on this machine.

The daemon's figures through Kafka mix two costs: the broker round trip (producer batching,
the broker, the consumer's fetches) and the analysis. This phase offers the same fly runs at
the same rates to a consumer that only receives and decodes, with the daemon's own input
adapter (:class:`~xasflow.adapters.kafka_input.KafkaDocumentSource`, its consumer settings,
its msgpack decoder), and judges it by the same rule (``bench/stream.py``'s
``consumer_level``: nothing lost, p99 from the raw event's ``time`` to the document taken
off the adapter's queue). It is to Kafka what ``raw_ceiling_rate_hz`` is to 0MQ in
``bench/stream.py``: no analysing daemon can beat it on the same broker and machine.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import stream as zs  # bench/stream.py (on sys.path: bench/kafka.py puts it there)

PHASE = "transport"


def consumer_role(args: argparse.Namespace) -> int:
    """Child: the daemon's Kafka input on ``args.topic``, documents taken and dropped; records
    (descriptor, seq_num, event time, time taken) per event, as ``bench/stream.py``'s raw
    consumer does; ``report`` on stdin prints and clears them."""
    from kafka_broker import CONSUMER

    from xasflow.adapters.kafka_input import KafkaDocumentSource, KafkaInputSettings

    lock = threading.Lock()
    records: list[list[Any]] = []
    settings = KafkaInputSettings(
        bootstrap_servers=args.servers,
        topics=(args.topic,),
        group_id=uuid.uuid4().hex,
        consumer=CONSUMER,  # as the daemon's (bench/kafka.py's kafka_daemon)
    )
    source = KafkaDocumentSource(settings)
    source.start()
    if not source.ready.wait(30):
        raise SystemExit(f"the transport consumer did not subscribe to {args.topic}")

    threading.Thread(
        target=zs.record_events, args=(source, records, None, source.mark_processed), daemon=True
    ).start()
    zs._say({"ready": True}, lock)
    zs.serve_reports(records, lock)
    source.close()
    os._exit(0)  # librdkafka's threads: no clean stop needed from here


def transport_ladder(
    broker: Any, pub: zs.Child, args: argparse.Namespace, me: list[str], logs: Path
) -> dict[str, Any]:
    """The rate ladder through ``broker`` to the bare input adapter. Leaves the publisher
    producing to this phase's topic: a later ``stream`` command must name its own (the
    SIGKILL and failover phases do)."""
    topic = f"bench-{PHASE}.bluesky.runengine.documents"
    broker.create_topic(topic, 4)
    consumer = zs.Child(
        [*me, "--role", "transport-consumer", "--servers", broker.bootstrap, "--topic", topic],
        "Kafka transport consumer",
        logs / "transport-consumer.log",
    )
    try:
        consumer.read(120)
        warm = {"cmd": "stream", "rate": 50, "n": 20, "per_run": 20, "topic": topic}
        pub.send(warm)  # the publisher now produces to this topic
        pub.read(60)
        deadline = time.monotonic() + 60
        got = 0
        while got < 20 and time.monotonic() < deadline:  # the group joined and fetching
            consumer.send({"cmd": "report"})
            got += len(consumer.read(60)["records"])
            time.sleep(0.2)
        levels = zs.ladder(
            lambda r: zs.consumer_level(pub, consumer, r, args, args.seconds + 10),
            args.rates,
            "kafka-transport",
            stop_on_fail=False,
        )
    finally:
        consumer.close()
    best = zs.sustained(levels)
    return {
        "consumer": "xasflow KafkaDocumentSource (the daemon's input adapter and settings, "
        "msgpack decoder); the processing side only takes documents",
        "levels": levels,
        "sustained_rate_hz": best["offered_rate_hz"] if best else 0,
        "p99_latency_ms": best["p99_latency_ms"] if best else None,
    }
