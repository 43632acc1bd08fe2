"""What the Kafka tests against a real broker share: noisy Cu K spectra, documents produced as
bluesky-kafka produces them, a reader of everything on a topic, and a daemon's Kafka config."""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from helpers import CU_K
from kafka_broker import CONSUMER, Broker
from synthetic_feff import model_mu

from xasflow import paths
from xasflow.adapters.kafka_bus import decode_kafka_value
from xasflow.daemon.config import DaemonConfig

ENERGY = np.linspace(8800.0, 9120.0, 1000)
LOG = logging.getLogger("test_kafka.librdkafka")  # not onto stderr after the broker stops
DEADLINE_S = 90.0


def spectra(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """I0/It/Ir of ``n`` noisy Cu K spectra with a Cu foil reference."""
    rng = np.random.default_rng(seed)
    mu = model_mu(ENERGY, CU_K + 4.0, 1.6, 6.0, 1.95)
    ref = 0.5 + np.arctan((ENERGY - CU_K) / 1.5) / np.pi
    out = []
    for _ in range(n):
        i0 = 1e9 * (1 + 0.01 * rng.standard_normal(ENERGY.size))
        it = i0 * np.exp(-mu - 0.3)
        out.append({"I0": i0, "It": it, "Ir": it * np.exp(-ref)})
    return out


def bluesky_kafka_value(name: str, doc: dict[str, Any]) -> bytes:
    """bluesky-kafka's default serializer: msgpack of (name, doc) with msgpack-numpy."""
    import msgpack_numpy

    return msgpack.dumps((name, doc), default=msgpack_numpy.encode)


class RawProducer:
    """Publishes documents as bluesky-kafka does, keyed by the run's start uid."""

    def __init__(self, servers: str, topic: str) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.producer = Producer({"bootstrap.servers": servers, "linger.ms": 1, "logger": LOG})

    def run(
        self, docs: list[tuple[str, dict[str, Any]]], partition: int | None = None, key: str = ""
    ) -> None:
        """Produce ``docs`` (keyed by ``key``, else the first document's start uid)."""
        key = key or docs[0][1]["uid"]
        for name, doc in docs:
            extra = {} if partition is None else {"partition": partition}
            self.producer.produce(self.topic, bluesky_kafka_value(name, doc), key, **extra)
        assert self.producer.flush(10) == 0


class TopicReader:
    """Everything on ``topic`` from its beginning, read by a thread: ``(key, name, doc)``."""

    def __init__(self, servers: str, topic: str, partitions: int = 4) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.consumer = Consumer(
            {
                "bootstrap.servers": servers,
                "group.id": uuid.uuid4().hex,
                **CONSUMER,
                "logger": LOG,
            }
        )
        self.consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)]
        )
        self.docs: list[tuple[str, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self.consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            name, doc = decode_kafka_value(msg.value())
            with self._lock:
                self.docs.append(((msg.key() or b"").decode(), name, doc))

    def all(self) -> list[tuple[str, str, dict[str, Any]]]:
        with self._lock:
            return list(self.docs)

    def stops(self) -> dict[str, dict[str, Any]]:
        """Raw uid (the key) -> analysis stop."""
        return {k: d for k, n, d in self.all() if n == "stop"}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.consumer.close()


def kafka_config(
    broker: Broker, group: str, topic: str, out_topic: str, store: Path, http: bool = True
) -> DaemonConfig:
    return DaemonConfig().with_updates(
        {
            "input": {
                "kind": "kafka",
                "kafka": {
                    "bootstrap_servers": broker.bootstrap,
                    "topics": [topic],
                    "group_id": group,
                    "commit_interval_s": 0.2,
                    "consumer": CONSUMER,
                },
            },
            "output": {"kind": "kafka", "kafka": {"topic": out_topic}},
            "models": {"directory": str(paths.REPO_ROOT / "models"), "watch": False},
            "storage": {"directory": str(store), "flush_interval_s": 0.05},
            "http": {"port": 0, "enabled": http},
            "recommend": {"enabled": False},
        }
    )
