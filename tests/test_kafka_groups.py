"""Kafka consumer groups: runs split between daemons, a restart after SIGKILL, the commit rule.

What must hold: two daemons in one group split the runs, each analysed by exactly one; a
daemon SIGKILLed mid-run and restarted leaves every result in the store exactly once
(offsets are committed only after the results are durable; the store skips seq_nums it
already holds); the commit never passes an open run, and a lost partition's runs are
handed over.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("confluent_kafka", reason="the kafka extra is not installed")
pytest.importorskip("tiled")

from helpers import daemon_health, fly_scan, free_port, serve_subprocess, wait_for
from kafka_broker import Broker
from kafka_helpers import DEADLINE_S, ENERGY, RawProducer, TopicReader, kafka_config, spectra

from xasflow import paths
from xasflow.adapters.kafka_bus import KafkaInputSettings
from xasflow.adapters.kafka_input import KafkaDocumentSource
from xasflow.adapters.tiled_schema import TABLE_FILES, _serve
from xasflow.adapters.tiled_store import read_analysis
from xasflow.daemon.service import Daemon


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
    held = [_held(tmp_path / f"s{i}", uids) for i in range(2)]
    assert held[0] | held[1] == set(uids) and not held[0] & held[1]  # each by exactly one
    assert len(held[0]) == len(held[1]) == 4 and per_daemon == [4, 4]


def _held(store: Path, uids: list[str]) -> set[str]:
    """The runs of ``uids`` with rows in ``store``, read through one catalog served once (by
    directory, ``read_analysis`` serves the catalog anew for each run: ~1 s each)."""
    uris = [
        f"{kind}:///{store / name}" for kind, name in TABLE_FILES.items() if (store / name).exists()
    ]
    with _serve(store, uris) as root:
        return {u for u in uids if _stored(root, u)}


def _stored(root: Any, uid: str) -> bool:
    try:
        return len(read_analysis(root, uid)[1]) > 0
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
