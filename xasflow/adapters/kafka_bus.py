"""Bluesky documents on Kafka: bluesky-kafka's wire format and the analysis publisher.

Wire format (bluesky-kafka's ``Publisher``/``BasicProducer`` with its msgpack serializer,
as NSLS-II runs it): one Kafka message per document, value ``msgpack.dumps((name, doc),
default=msgpack_numpy.encode)`` (a 2-array ``[name, doc]``, numpy arrays as msgpack-numpy
maps), key = the run's start uid, so that a run stays in order on one partition. Values
are read with :func:`~xasflow.adapters.wire.decode_msgpack` (msgpack-numpy conventions,
object arrays only through the restricted unpickler), never with ``msgpack_numpy.decode``.

:class:`KafkaDocumentPublisher` puts the daemon's analysis documents on a topic of their
own, keyed by the **raw** run's start uid (the analysis start's ``raw_uid``), so the
analysis of a raw run lands on one partition in order, beside nothing else. The consumer
side is :mod:`xasflow.adapters.kafka_input`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from xasflow.adapters.kafka_log import OutageLog
from xasflow.adapters.wire import DOCUMENT_NAMES, WireError, decode_msgpack, encode_msgpack

__all__ = [
    "FETCH_WAIT_MAX_MS",
    "KafkaDocumentPublisher",
    "KafkaInputSettings",
    "KafkaOutputSettings",
    "RunKeys",
    "decode_counted",
    "decode_kafka_value",
    "encode_kafka_value",
]

logger = logging.getLogger(__name__)

_POLL_EVERY = 64  # documents produced between two serves of delivery reports
#: The consumer's ``fetch.wait.max.ms``: Apache Kafka answers a waiting fetch as soon as data
#: arrive, so this only paces idle fetches (10 requests/s per broker; librdkafka's own is 500).
#: Tansu (the tests' broker) waits it out, adding it to latency: tests and benches set 10.
FETCH_WAIT_MAX_MS = 100


def encode_kafka_value(name: str, doc: dict[str, Any]) -> bytes:
    """One document as bluesky-kafka serialises it: msgpack of ``(name, doc)`` + numpy."""
    if name not in DOCUMENT_NAMES:
        raise ValueError(f"unknown document name {name!r}")
    if not isinstance(doc, dict):
        raise TypeError(f"doc must be a dict, not {type(doc).__name__}")
    return encode_msgpack((name, doc))


def decode_kafka_value(value: bytes | None) -> tuple[str, dict[str, Any]]:
    """``(name, doc)`` from a bluesky-kafka message value; ``WireError`` for anything else."""
    if not value:
        raise WireError("empty_body")
    obj = decode_msgpack(value)
    if not isinstance(obj, list | tuple) or len(obj) != 2:
        raise WireError("bad_framing", "expected a msgpack array [name, doc]")
    name, doc = obj
    if not isinstance(name, str):
        raise WireError("bad_name", f"document name of type {type(name).__name__}")
    if name not in DOCUMENT_NAMES:
        raise WireError("unknown_document", repr(name[:40]))
    if not isinstance(doc, dict):
        raise WireError("not_a_dict", f"body decoded to {type(doc).__name__}")
    return name, doc


def decode_counted(
    value: bytes | None,
) -> tuple[str | None, dict[str, Any], dict[str, int], str | None]:
    """One message value decoded, and what it adds to the input's counters:
    ``(name, doc, counts, error)``. ``counts``: ``received``, ``bytes_received``, then
    ``decoded`` and ``documents.<name>``, or ``decode_errors`` and ``decode_errors.<reason>``
    (``internal``: a decoder bug); undecodable, ``name`` is None and ``error`` says why."""
    counts = {"received": 1, "bytes_received": len(value or b"")}
    try:
        name, doc = decode_kafka_value(value)
    except WireError as exc:
        reason, error = exc.reason, str(exc)
    except Exception as exc:  # a decoder bug must not stop the receive thread
        reason, error = "internal", f"{type(exc).__name__}: {exc}"
    else:
        counts.update({"decoded": 1, f"documents.{name}": 1})
        return name, doc, counts, None
    counts.update({"decode_errors": 1, f"decode_errors.{reason}": 1})
    return None, {}, counts, error


class RunKeys:
    """Which run a document belongs to: start uid by descriptor, forgotten at the stop.

    ``key(name, doc)`` gives the run's start uid (the analysis start's ``raw_uid`` when
    ``raw=True``), or None for a document of a run not seen from its start.
    """

    def __init__(self, raw: bool = False) -> None:
        self.raw = raw
        self._runs: dict[str, str] = {}  # start uid -> key
        self._descriptors: dict[str, str] = {}  # descriptor uid -> start uid
        self._children: dict[str, list[str]] = {}  # start uid -> its descriptors

    def key(self, name: str, doc: dict[str, Any]) -> str | None:
        """The key of ``doc``; a stop also forgets its run."""
        if name == "start":
            uid = str(doc.get("uid"))
            key = str(doc.get("raw_uid") or uid) if self.raw else uid
            self._runs[uid] = key
            self._children[uid] = []
            return key
        if name in ("event", "event_page"):
            owner = self._descriptors.get(str(doc.get("descriptor")))
            return self._runs.get(owner) if owner is not None else None
        start = str(doc.get("run_start"))
        found = self._runs.get(start)
        if name == "descriptor" and found is not None:
            self._descriptors[str(doc.get("uid"))] = start
            self._children[start].append(str(doc.get("uid")))
        elif name == "stop":
            self._runs.pop(start, None)
            for desc in self._children.pop(start, []):
                self._descriptors.pop(desc, None)
        return found

    def run_of(self, name: str, doc: dict[str, Any]) -> str | None:
        """The start uid ``doc`` belongs to, without forgetting anything."""
        if name == "start":
            return str(doc.get("uid"))
        if name in ("event", "event_page"):
            return self._descriptors.get(str(doc.get("descriptor")))
        return str(doc.get("run_start")) if doc.get("run_start") else None


@dataclass(frozen=True)
class KafkaInputSettings:
    """A consumer-group member's settings; ``topics`` entries starting ``^`` are regexes.

    ``session_timeout_ms``/``heartbeat_interval_ms``: a killed member's partitions move to
    the others after at most the session timeout (6 s here, so failover stays under 15 s).
    ``consumer``: further librdkafka settings (they win over these), e.g.
    ``{"fetch.wait.max.ms": 10}`` on a broker that waits a fetch out (Tansu).
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    topics: tuple[str, ...] = ("^.*\\.bluesky\\.runengine\\.documents$",)
    group_id: str = "xasflow"
    auto_offset_reset: str = "earliest"
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    queue_size: int = 10_000
    commit_interval_s: float = 0.5
    flush_timeout_s: float = 10.0
    poll_interval_s: float = 0.05
    consumer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "topics", tuple(self.topics))
        if not self.topics or not all(isinstance(t, str) and t for t in self.topics):
            raise ValueError("topics must be a non-empty list of topic names or ^regexes")
        if not self.group_id:
            raise ValueError("group_id must not be empty")
        if self.queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        if self.commit_interval_s <= 0 or self.poll_interval_s <= 0:
            raise ValueError("commit_interval_s and poll_interval_s must be > 0")
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be at most a third of session_timeout_ms")

    def consumer_config(self) -> dict[str, Any]:
        """The librdkafka configuration of the consumer."""
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": self.auto_offset_reset,
            "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": self.heartbeat_interval_ms,
            "partition.assignment.strategy": "cooperative-sticky",
            "topic.metadata.refresh.interval.ms": 5000,  # new topics matching a ^pattern
            "fetch.wait.max.ms": FETCH_WAIT_MAX_MS,
            **self.consumer,
        }


@dataclass(frozen=True)
class KafkaOutputSettings:
    """Where analysis documents go: ``topic`` on ``bootstrap_servers``; ``producer`` adds
    librdkafka settings (e.g. ``{"acks": "all"}``)."""

    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "xasflow.analysis.documents"
    producer: dict[str, Any] = field(default_factory=dict)
    flush_timeout_s: float = 10.0


class KafkaDocumentPublisher:
    """Publish analysis documents to Kafka in bluesky-kafka's format, keyed by the raw run.

    Thread-safe (librdkafka's producer is). ``stats()``: ``sent`` (handed to the producer),
    ``bytes_sent``, ``delivered``, ``delivery_failures``, ``unkeyed`` (documents of a run
    whose start this publisher never saw, sent without a key), ``queue_full_waits``.
    """

    def __init__(self, settings: KafkaOutputSettings) -> None:
        from confluent_kafka import Producer

        self.settings = settings
        self._log = OutageLog()
        conf: dict[str, Any] = {
            "bootstrap.servers": settings.bootstrap_servers,
            "linger.ms": 2,
            "enable.idempotence": False,
            "logger": self._log,  # librdkafka's log into logging (bounded), not onto stderr
            **settings.producer,
        }
        self._producer = Producer(conf)
        self._keys = RunKeys(raw=True)
        self._lock = threading.RLock()  # delivery callbacks run inside produce's poll
        self._stats = dict.fromkeys(
            ("sent", "bytes_sent", "delivered", "delivery_failures", "unkeyed", "queue_full_waits"),
            0,
        )
        self.last_error: str | None = None
        self._closed = False

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Encode and produce one analysis document (a sink of the processor)."""
        value = encode_kafka_value(name, doc)
        with self._lock:
            if self._closed:
                raise RuntimeError("publisher is closed")
            key = self._keys.key(name, doc)
            if key is None:
                self._stats["unkeyed"] += 1
            self._produce(key, value)
            self._stats["sent"] += 1
            self._stats["bytes_sent"] += len(value)
        self._log.tick()  # an outage of the broker gone quiet: one line says so

    def tick(self) -> None:
        """Serve librdkafka's queue (its log lines, delivery reports) and end an outage gone
        quiet. Call it a few times a second (the daemon's stats tick): librdkafka hands its log
        over only in ``poll``, which publishing does every 64 documents, so without it a quiet
        beamline logged neither an outage nor its end."""
        self._producer.poll(0)
        self._log.tick()

    def _produce(self, key: str | None, value: bytes) -> None:
        from confluent_kafka import KafkaException

        while True:
            try:
                self._producer.produce(
                    self.settings.topic, value=value, key=key, on_delivery=self._delivered
                )
                break
            except BufferError:  # librdkafka's local queue is full: serve callbacks, retry
                self._stats["queue_full_waits"] += 1
                self._producer.poll(0.05)
            except KafkaException as exc:
                self._stats["delivery_failures"] += 1
                self.last_error = str(exc)
                logger.error("cannot produce to %s: %s", self.settings.topic, exc)
                return
        if self._stats["sent"] % _POLL_EVERY == 0:
            # poll() releases the GIL, which costs the processing thread a GIL hand-over per
            # call; delivery reports are served here now and then and by flush()
            self._producer.poll(0)

    def _delivered(self, err: Any, msg: Any) -> None:
        with self._lock:
            if err is None:
                self._stats["delivered"] += 1
                return
            self._stats["delivery_failures"] += 1
            self.last_error = str(err)
            logger.error("analysis document not delivered to %s: %s", self.settings.topic, err)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every produced document is acknowledged by the broker; False on timeout,
        and for good once one was not delivered (:attr:`undelivered`): a document that failed
        leaves librdkafka's queue too, so an empty queue alone would call it acknowledged."""
        left = self._producer.flush(self.settings.flush_timeout_s if timeout is None else timeout)
        return int(left) == 0 and not self.undelivered

    @property
    def undelivered(self) -> int:
        """Documents the broker never acknowledged (failed delivery or produce): the Kafka
        input commits no offset past them (``Daemon._commit_hold``), so a restart has Kafka
        redeliver their raw documents and they are published again."""
        with self._lock:
            return self._stats["delivery_failures"]

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters (see the class docstring)."""
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        """Deliver what is queued (up to ``flush_timeout_s``), then refuse new documents."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not self.flush():
            logger.error("analysis documents still undelivered to Kafka at close")
