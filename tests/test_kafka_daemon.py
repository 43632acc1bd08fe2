"""Kafka input and output of one daemon against a real Kafka-protocol broker (kafka_broker.py).

What must hold: bluesky-kafka's wire format round-trips through the broker; a daemon in a
consumer group analyses a run from Kafka and publishes the analysis on its own topic keyed
by the raw run's start uid; a full store holds the consumer back, and lost output holds the
commits; an input pattern matching the output topic is refused.
"""

from __future__ import annotations

import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("confluent_kafka", reason="the kafka extra is not installed")
pytest.importorskip("tiled")

import msgpack
from helpers import fly_scan, free_port, wait_for
from kafka_broker import CONSUMER, Broker
from kafka_helpers import DEADLINE_S, ENERGY, LOG, RawProducer, TopicReader, kafka_config, spectra
from store_helpers import failing_appends

from xasflow.adapters.kafka_bus import KafkaInputSettings, KafkaOutputSettings, encode_kafka_value
from xasflow.adapters.kafka_input import KafkaDocumentSource
from xasflow.adapters.tiled_store import read_analysis
from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.service import Daemon


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
        consumer=CONSUMER,
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


def test_results_the_store_lost_are_redelivered_to_the_next_daemon(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the journal (``storage.journal: false``) a batch whose append fails past the
    store's retries is lost. Its offsets must not be committed: the daemon says why in
    ``/health``, and the next daemon of the group gets the run again and stores what was
    lost, every result once. Before, the commit went past the lost results for good."""
    failures = failing_appends(monkeypatch)  # the first batch is lost (the catalog in-process)
    topic, out_topic = f"in-{uuid.uuid4().hex[:6]}", f"out-{uuid.uuid4().hex[:6]}"
    broker.create_topic(topic, 1)
    broker.create_topic(out_topic, 1)
    cfg = kafka_config(broker, "g-lost-store", topic, out_topic, tmp_path / "store", http=False)
    cfg = cfg.with_updates({"storage": {"journal": False, "catalog_process": False}})
    uid, docs = fly_scan(ENERGY, spectra(6, seed=3))
    daemon = Daemon(cfg)
    daemon.start()
    try:
        RawProducer(broker.bootstrap, topic).run(docs)

        def held() -> dict[str, Any] | None:
            h = daemon.view.health()["input"]["kafka"]
            return h if h["commit_hold"] and h["commits_held"] >= 1 else None

        health = wait_for(held, "commits held for the lost results", timeout=DEADLINE_S)
        assert "the store lost" in health["commit_hold"]
        assert all(p["committed"] is None for p in health["partitions"].values())
        lost = daemon.view.store_stats()["write_lost"]
        assert lost >= 1
    finally:
        daemon.stop(timeout=10)
    assert failures["left"] == 0
    again = Daemon(cfg)  # the run is redelivered: nothing was committed past it
    again.start()
    try:

        def committed() -> dict[str, Any] | None:
            h = again.view.health()["input"]["kafka"]
            done = [p for p in h["partitions"].values() if p["committed"] == len(docs)]
            return h if done else None

        health = wait_for(committed, "the run's offsets committed", timeout=DEADLINE_S)
        assert health["commit_hold"] is None
        assert again.view.store_stats()["write_lost"] == 0
    finally:
        again.stop()
    _, rows = read_analysis(tmp_path / "store", uid)
    assert sorted(rows["seq_num"]) == list(range(1, 7))  # each result once


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
