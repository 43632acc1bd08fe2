"""Kafka input and output against a real Kafka-protocol broker (Tansu, see kafka_broker.py).

What must hold: bluesky-kafka's wire format round-trips through the broker; a daemon in a
consumer group analyses a run from Kafka and publishes the analysis on its own topic keyed
by the raw run's start uid; two daemons in one group split the runs, each analysed by
exactly one; a daemon SIGKILLed mid-run and restarted leaves every result in the store
exactly once (offsets are committed only after the results are durable; the store skips
seq_nums it already holds).
"""

from __future__ import annotations

import logging
import signal
import threading
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("confluent_kafka", reason="the kafka extra is not installed")
pytest.importorskip("tiled")

import msgpack
from helpers import CU_K, daemon_health, fly_scan, free_port, serve_subprocess, wait_for
from kafka_broker import Broker
from synthetic_feff import model_mu

from xasflow import paths
from xasflow.adapters.kafka_bus import (
    KafkaInputSettings,
    KafkaOutputSettings,
    decode_kafka_value,
    encode_kafka_value,
)
from xasflow.adapters.kafka_input import KafkaDocumentSource
from xasflow.adapters.tiled_store import read_analysis
from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.service import Daemon

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
                "fetch.wait.max.ms": 10,
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
                },
            },
            "output": {"kind": "kafka", "kafka": {"topic": out_topic}},
            "models": {"directory": str(paths.REPO_ROOT / "models"), "watch": False},
            "storage": {"directory": str(store), "flush_interval_s": 0.05},
            "http": {"port": 0, "enabled": http},
            "recommend": {"enabled": False},
        }
    )


def test_bluesky_kafka_wire_format_round_trips_through_the_broker(broker: Broker) -> None:
    topic = f"bl{uuid.uuid4().hex[:6]}.bluesky.runengine.documents"
    broker.create_topic(topic, 2)
    uid, docs = fly_scan(ENERGY, spectra(3))
    RawProducer(broker.bootstrap, topic).run(docs)
    from confluent_kafka import Producer

    bad = Producer({"bootstrap.servers": broker.bootstrap, "logger": LOG})
    bad.produce(topic, b"\xc1 not msgpack", uid, partition=0)
    bad.produce(topic, msgpack.dumps(["bulk_events", {}]), uid, partition=0)
    bad.flush(10)
    settings = KafkaInputSettings(
        bootstrap_servers=broker.bootstrap,
        topics=("^bl.*\\.bluesky\\.runengine\\.documents$",),
        group_id=uuid.uuid4().hex,
    )
    source = KafkaDocumentSource(settings)
    source.start()
    got = []
    try:
        wait_for(
            lambda: got.append(source.get(0.1)) or len([g for g in got if g]) >= len(docs),
            "the run's documents from the broker",
            timeout=DEADLINE_S,
        )
        wait_for(lambda: source.stats()["decode_errors"] == 2, "the two bad values counted")
    finally:
        source.close()
        source.finish(0)
    got = [g for g in got if g]
    assert [n for n, _ in got] == [n for n, _ in docs]  # one key: one partition, in order
    first = got[2][1]
    assert first["seq_num"] == 1 and isinstance(first["data"]["I0"], np.ndarray)
    np.testing.assert_array_equal(first["data"]["I0"], docs[2][1]["data"]["I0"])
    stats = source.stats()
    assert stats["decode_errors.msgpack_invalid"] == 1
    assert stats["decode_errors.unknown_document"] == 1
    # our encoder is what bluesky-kafka's deserializer reads
    import msgpack_numpy

    name, doc = msgpack.loads(encode_kafka_value(*docs[2]), object_hook=msgpack_numpy.decode)
    assert name == "event"
    np.testing.assert_array_equal(doc["data"]["It"], docs[2][1]["data"]["It"])
    assert KafkaOutputSettings().topic == "xasflow.analysis.documents"


def test_daemon_analyses_a_kafka_run_and_publishes_keyed_by_raw_uid(
    broker: Broker, tmp_path: Path
) -> None:
    topic, out_topic = f"in-{uuid.uuid4().hex[:6]}", f"out-{uuid.uuid4().hex[:6]}"
    broker.create_topic(topic, 4)
    broker.create_topic(out_topic, 4)
    daemon = Daemon(kafka_config(broker, "g1", topic, out_topic, tmp_path / "store"))
    daemon.start()
    reader = TopicReader(broker.bootstrap, out_topic)
    try:
        uid, docs = fly_scan(ENERGY, spectra(6, seed=1))
        RawProducer(broker.bootstrap, topic).run(docs)
        stop = wait_for(
            lambda: reader.stops().get(uid), "the analysis stop on the output topic", DEADLINE_S
        )
        assert stop["exit_status"] == "success" and stop["n_analysed"] == 6
        out = reader.all()
        assert {key for key, _, _ in out} == {uid}  # keyed by the raw run, start to stop
        assert out[0][1] == "start" and out[-1][1] == "stop"
        # events, or event pages of the spectra analysed in one batch: six rows in all
        assert sum(1 if n == "event" else len(d["seq_num"]) for _, n, d in out if "event" in n) == 6

        def committed() -> dict[str, Any] | None:
            h = daemon.view.health()["input"]["kafka"]
            parts = [p for p in h["partitions"].values() if p["committed"] == len(docs)]
            lag = sum(p["lag"] or 0 for p in h["partitions"].values())
            return h if parts and h["commits"] >= 1 and lag == 0 else None

        health = wait_for(committed, "the run's offsets committed, no lag", timeout=DEADLINE_S)
        assert health["group_id"] == "g1" and health["commit_failures"] == 0
        assert health["rebalances"] >= 1

        # the exported values, not only the names (a # HELP line carries those); /metrics
        # takes the input's figures at the processing loop's statistics tick, so once it has
        # the lag of the assigned partitions it holds at most the commits made by now
        def exported() -> dict[str, list[tuple[str, float]]] | None:
            samples = _samples(_get(f"{daemon.http_url}/metrics")[1])
            lag = samples.get("xasflow_kafka_consumer_lag", [])
            commits = samples["xasflow_kafka_commits_total"][0][1]
            return samples if lag and commits >= 1 else None

        samples = wait_for(exported, "the Kafka figures on /metrics", timeout=DEADLINE_S)
        after = daemon.view.health()["input"]["kafka"]
        assert samples["xasflow_kafka_commits_total"][0][1] <= after["commits"]
        assert samples["xasflow_kafka_rebalances_total"][0][1] == after["rebalances"]
        assert samples["xasflow_kafka_commit_failures_total"][0][1] == 0
        lag = samples["xasflow_kafka_consumer_lag"]
        assigned = [k for k, p in after["partitions"].items() if p["committed"] is not None]
        assert len(lag) >= len(assigned) >= 1 and all(value == 0 for _, value in lag)
    finally:
        daemon.stop()
        reader.close()
    metadata, rows = read_analysis(tmp_path / "store", uid)
    assert len(rows) == 6 and metadata["stop"]["exit_status"] == "success"


def test_a_full_store_holds_the_consumer_back_instead_of_dropping(
    broker: Broker, tmp_path: Path
) -> None:
    """A store that holds at most 4 rows for its catalog (``storage.max_queue``) under a run
    of 40 spectra, analysed in pages of many rows: with a Kafka input a page waits for room
    (or an empty queue) instead of being refused, so every result is stored, nothing is
    refused and the offsets are committed past the run (0MQ's refuse-at-once drops most of
    each page; the waits themselves are timed in ``test_tiled_store``)."""
    topic, out_topic = f"in-{uuid.uuid4().hex[:6]}", f"out-{uuid.uuid4().hex[:6]}"
    broker.create_topic(topic, 1)
    broker.create_topic(out_topic, 1)
    cfg = kafka_config(broker, "g-full", topic, out_topic, tmp_path / "store")
    # pages of at most 8 rows: the next comes while the last still waits for the catalog
    # (0.2 s batches), so the 4-row limit is reached for sure, not only by timing
    cfg = cfg.with_updates(
        {"storage": {"max_queue": 4}, "analysis": {"batching": {"max_spectra": 8}}}
    )
    daemon = Daemon(cfg)
    daemon.start()
    try:
        uid, docs = fly_scan(ENERGY, spectra(40, seed=5))
        RawProducer(broker.bootstrap, topic).run(docs)

        def committed() -> dict[str, Any] | None:
            h = daemon.view.health()["input"]["kafka"]
            done = [p for p in h["partitions"].values() if p["committed"] == len(docs)]
            return h if done else None

        health = wait_for(committed, "the run's offsets committed", timeout=DEADLINE_S)
        assert health["commit_hold"] is None and health["commits_held"] == 0
        queue = daemon.view.health()["limits"]["store_queue"]
        assert queue["dropped"] == 0 and queue["full_wait_s"] == 60.0
        # the 4-row limit was in force and reached: pages waited for room at least once
        assert daemon.view.store_stats()["full_waits"] >= 1
    finally:
        daemon.stop()
    _, rows = read_analysis(tmp_path / "store", uid)
    assert sorted(rows["seq_num"]) == list(range(1, 41))


def test_no_offset_is_committed_past_documents_the_output_lost(
    broker: Broker, tmp_path: Path
) -> None:
    """The Kafka output's broker is gone, so its documents expire undelivered: the input's
    offsets stay uncommitted and ``/health`` says why (a restart replays the run and
    publishes it again). Before, the publisher's empty queue counted as acknowledged and the
    offsets were committed past results the bus never got."""
    topic = f"in-{uuid.uuid4().hex[:6]}"
    broker.create_topic(topic, 1)
    cfg = kafka_config(broker, "g-lost-out", topic, "out", tmp_path / "store", http=False)
    dead = f"127.0.0.1:{free_port()}"  # nobody listens
    cfg = cfg.with_updates(
        {"output": {"kafka": {"bootstrap_servers": dead, "producer": {"message.timeout.ms": 500}}}}
    )
    daemon = Daemon(cfg)
    daemon.start()
    try:
        _, docs = fly_scan(ENERGY, spectra(3, seed=2))
        RawProducer(broker.bootstrap, topic).run(docs)

        def held() -> dict[str, Any] | None:
            h = daemon.view.health()["input"]["kafka"]
            return h if h["commit_hold"] and h["commits_held"] >= 1 else None

        health = wait_for(held, "commits held for the lost output", timeout=DEADLINE_S)
        assert "not delivered to Kafka" in health["commit_hold"]
        assert all(p["committed"] is None for p in health["partitions"].values())
    finally:
        daemon.stop(timeout=10)


def _samples(text: str) -> dict[str, list[tuple[str, float]]]:
    """Prometheus text -> metric name -> [(labels, value)] (comment lines skipped)."""
    out: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        name, _, labels = key.partition("{")
        out.setdefault(name, []).append((labels.rstrip("}"), float(value)))
    return out


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


def test_two_daemons_in_one_group_split_the_runs(broker: Broker, tmp_path: Path) -> None:
    topic, out_topic = f"in-{uuid.uuid4().hex[:6]}", f"out-{uuid.uuid4().hex[:6]}"
    broker.create_topic(topic, 4)
    broker.create_topic(out_topic, 4)
    daemons = [
        Daemon(kafka_config(broker, "g2", topic, out_topic, tmp_path / f"s{i}", http=i == 0))
        for i in range(2)
    ]
    for d in daemons:
        d.start()
    reader = TopicReader(broker.bootstrap, out_topic)
    try:
        wait_for(
            lambda: all(d.view.input_stats()["assigned_partitions"] == 2 for d in daemons),
            "both daemons holding two partitions each",
            timeout=DEADLINE_S,
        )
        producer = RawProducer(broker.bootstrap, topic)
        uids = []
        for i in range(8):
            uid, docs = fly_scan(ENERGY, spectra(2, seed=10 + i))
            producer.run(docs, partition=i % 4)
            uids.append(uid)
        stops = wait_for(
            lambda: (s := reader.stops()).keys() >= set(uids) and s,
            "eight analysis stops",
            timeout=DEADLINE_S,
        )
        assert all(stops[u]["exit_status"] == "success" for u in uids)
        per_daemon = [d.view.health()["counters"]["runs_opened"] for d in daemons]
    finally:
        for d in daemons:
            d.stop()
        reader.close()
    held = [{u for u in uids if _stored(tmp_path / f"s{i}", u)} for i in range(2)]
    assert held[0] | held[1] == set(uids) and not held[0] & held[1]  # each by exactly one
    assert len(held[0]) == len(held[1]) == 4 and per_daemon == [4, 4]


def _stored(store: Path, uid: str) -> bool:
    try:
        return len(read_analysis(store, uid)[1]) > 0
    except KeyError:
        return False


def test_sigkill_mid_run_and_restart_store_holds_every_result_once(
    broker: Broker, tmp_path: Path
) -> None:
    topic, out_topic = f"in-{uuid.uuid4().hex[:6]}", f"out-{uuid.uuid4().hex[:6]}"
    broker.create_topic(topic, 2)
    broker.create_topic(out_topic, 2)
    conf = tmp_path / "xasflow.yaml"
    conf.write_text(
        "input:\n  kind: kafka\n  kafka:\n"
        f"    bootstrap_servers: '{broker.bootstrap}'\n    topics: ['{topic}']\n"
        "    group_id: gk\n    commit_interval_s: 0.2\n"
        f"output:\n  kind: kafka\n  kafka:\n    topic: '{out_topic}'\n"
        f"models:\n  directory: {paths.REPO_ROOT / 'models'}\n  watch: false\n"
        f"storage:\n  directory: {tmp_path / 'store'}\n  flush_interval_s: 0.05\n"
        "  batch_size: 4\n"
        "recommend:\n  enabled: false\n"
    )
    producer = RawProducer(broker.bootstrap, topic)
    uid_b, docs_b = fly_scan(ENERGY, spectra(5, seed=3))
    uid_a, docs_a = fly_scan(ENERGY, spectra(30, seed=4))
    procs = [serve_subprocess(conf, port := free_port(), tmp_path / "d1.log")]
    reader = TopicReader(broker.bootstrap, out_topic, partitions=2)
    try:
        producer.run(docs_b, partition=0)  # a finished run, then run A half-way, same partition
        producer.run(docs_a[:14], partition=0)

        def stored_some() -> bool:
            h = daemon_health(port) or {}
            return h.get("store", {}).get("acknowledged", 0) >= 10 and (
                h["input"]["kafka"]["commits"] >= 1
            )

        wait_for(stored_some, "results of both runs acknowledged and a commit", DEADLINE_S)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        producer.run(docs_a[14:], partition=0, key=uid_a)  # the rest of run A while no daemon runs
        procs.append(serve_subprocess(conf, port := free_port(), tmp_path / "d2.log"))
        stop = wait_for(lambda: reader.stops().get(uid_a), "run A's analysis stop", DEADLINE_S)
        assert stop["exit_status"] == "success" and stop["n_analysed"] == 30
        # the redelivered rows the first daemon had stored are skipped by seq_num
        wait_for(
            lambda: (daemon_health(port) or {}).get("store", {}).get("duplicates", 0) >= 4,
            "the store to skip the rows it already held",
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        reader.close()
    meta_a, rows_a = read_analysis(tmp_path / "store", uid_a)
    assert sorted(rows_a["index"]) == list(range(30))  # every result, each once
    assert list(rows_a["seq_num"]) == list(range(1, 31))
    assert meta_a["stop"]["exit_status"] == "success"
    _, rows_b = read_analysis(tmp_path / "store", uid_b)
    assert sorted(rows_b["index"]) == list(range(5))


def test_commit_never_passes_an_open_run_and_revoked_runs_are_handed_over() -> None:
    """The commit rule's bookkeeping (no broker needed: documents are queued as the receive
    thread would queue them)."""
    from types import SimpleNamespace

    from xasflow.adapters.kafka_input import _Item

    source = KafkaDocumentSource(KafkaInputSettings(topics=("t",)))
    source._on_assign(None, [SimpleNamespace(topic="t", partition=0)])
    gen = source._offsets.gen[("t", 0)]
    docs = [
        ("start", {"uid": "A"}),
        ("descriptor", {"uid": "dA", "run_start": "A"}),
        ("event", {"descriptor": "dA", "seq_num": 1}),
        ("stop", {"run_start": "A"}),
        ("start", {"uid": "B"}),
        ("event", {"descriptor": "dB", "seq_num": 1}),
    ]
    for offset, (name, doc) in enumerate(docs):
        source._queue.put(_Item(name, doc, ("t", 0), offset, gen))
    for _ in range(3):  # start, descriptor, event of A taken and processed
        assert source.get(0) is not None
    assert source.committable() == {}  # nothing processed yet
    source.mark_processed()
    assert source.committable() == {("t", 0): 0}  # A is open: not past its start
    assert source.get(0) == ("stop", {"run_start": "A"})
    assert source.committable() == {("t", 0): 0}  # A's stop taken, not yet processed
    source.mark_processed()
    assert source.committable() == {("t", 0): 4}  # A done: everything before B
    source.get(0)
    source.get(0)
    source.mark_processed()
    assert source.committable() == {("t", 0): 4}  # B open: held at B's start (offset 4)
    source._queue.put(_Item("event", {"descriptor": "dB", "seq_num": 2}, ("t", 0), 6, gen))
    # what the committer would hand over (its snapshot, taken before the loss)
    snapshot = source.committable()
    with source._lock:
        gens = source._offsets.gens(snapshot)
    source._on_lost(None, [SimpleNamespace(topic="t", partition=0)])
    assert source.get(0) is None  # the queued document of the lost partition is dropped
    ((uid, reason),) = source.abandoned()
    assert uid == "B" and reason.startswith("lost: partition t[0] moved")
    stats = source.stats()
    assert stats["dropped_revoked"] == 1 and stats["runs_handed_over"] == 1
    assert source.committable() == {}  # a lost partition is not committed ...
    commits: list[Any] = []
    consumer = SimpleNamespace(commit=lambda **kw: commits.append(kw))
    source._commit(consumer, snapshot, gens, sync=False)
    assert snapshot == {("t", 0): 4} and commits == []  # ... nor a snapshot taken before


def test_an_input_pattern_matching_the_output_topic_is_refused(tmp_path: Path) -> None:
    from xasflow.daemon.service import DaemonError

    cfg = DaemonConfig().with_updates(
        {
            "input": {"kind": "kafka", "kafka": {"topics": ["^xasflow\\..*"]}},
            "output": {"kind": "kafka", "kafka": {"topic": "xasflow.analysis.documents"}},
            "models": {"directory": str(tmp_path), "watch": False},
            "storage": {"enabled": False},
            "http": {"enabled": False},
        }
    )
    with pytest.raises(DaemonError, match="its own analysis documents"):
        Daemon(cfg).start()
