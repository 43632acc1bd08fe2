"""A Kafka run analysed twice into one store: the first copy, closed before its end, must leave
no row the replay needs. The store keeps one row per (raw uid, seq_num), the first copy's, so
the first copy's rows must be the replay's first rows; a row made only because the copy was
closed early (``empty_run``, ``missing_stop``) would take the seq_num of the replay's first
result, which the store then skips as a duplicate.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("confluent_kafka", reason="the kafka extra is not installed")
pytest.importorskip("tiled")

from pipeline_helpers import channels
from scan_helpers import fly_scan, step_scan

from xasflow.adapters.kafka_bus import KafkaInputSettings
from xasflow.adapters.kafka_input import KafkaDocumentSource, _Item
from xasflow.adapters.store_writer import StoreWriter
from xasflow.adapters.tiled_store import AnalysisStore, read_analysis
from xasflow.daemon.assembly import RunAssembler
from xasflow.daemon.config import AnalysisConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.pipeline import Pipeline
from xasflow.daemon.processor import Processor

TP = ("t", 0)
PARTITION = [SimpleNamespace(topic="t", partition=0)]


def _processor(source: KafkaDocumentSource, pipeline: Pipeline, store: Any) -> Processor:
    proc = Processor(source.get, RunAssembler(), pipeline, Counters(), AnalysisConfig())
    proc.on_processed = source.mark_processed
    proc.abandoned = source.abandoned
    proc.runs_ended = source.runs_ended
    proc.outlet.store_sink = StoreWriter(store)
    proc.replays_open_runs = True  # as parts.build_processor sets it for a Kafka input
    return proc


def _queue(source: KafkaDocumentSource, docs: list[tuple[str, Any]]) -> None:
    gen = source._offsets.gen[TP]
    for offset, (name, doc) in enumerate(docs):
        source._queue.put(_Item(name, doc, TP, offset, gen))


def _turn(proc: Processor) -> None:
    proc._turn(proc._take(1000), check=False)
    proc._after_turn()


def test_a_run_handed_back_mid_run_is_stored_once_with_every_result(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """The partition is lost after the run's descriptor and assigned here again: the first
    copy is closed (no spectrum yet) and the replay analyses both spectra. Before, the first
    copy's close made an ``empty_run`` rejection row at seq_num 1, the store skipped the
    replay's first spectrum as its duplicate, and the catalog held rows [empty_run,
    spectrum 1] under a stop saying two analysed."""
    energy, chans = channels("CuO")
    uid, docs = fly_scan(energy, [chans, chans])
    source = KafkaDocumentSource(KafkaInputSettings(topics=("t",)), durable=lambda t: True)
    with AnalysisStore(tmp_path / "store", journal=True) as store:
        proc = _processor(source, pipeline, store)
        source._on_assign(None, PARTITION)
        _queue(source, docs[:2])  # start, descriptor
        _turn(proc)
        source._on_lost(None, PARTITION)
        source._on_assign(None, PARTITION)  # back here: redelivered from the commit
        _queue(source, docs)
        _turn(proc)
        assert source.committable() == {TP: len(docs)}
        assert store.flush(30)
        meta, rows = read_analysis(store, uid)
    assert meta["stop"]["exit_status"] == "success"
    assert list(rows["seq_num"]) == [1, 2]
    assert list(rows["index"]) == [0, 1]  # each spectrum once, no row of the first copy's close
    assert "empty_run" not in set(rows["reason"].dropna())


def test_a_step_scan_cut_by_a_shutdown_is_stored_with_its_spectrum_after_the_restart(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """A daemon with a Kafka input stops mid step scan: the run is closed "abort" and the
    commit stays at its start, so the next daemon analyses it from its start into the same
    store. Before, the shutdown's close made a ``missing_stop`` row at seq_num 1 and the
    store skipped the replay's spectrum (seq_num 1 too) as its duplicate: the catalog held
    the rejection under a stop saying one analysed."""
    energy, chans = channels("CuO", n=150)
    uid, docs = step_scan(energy, chans)
    with AnalysisStore(tmp_path / "store", journal=True) as store:
        first = KafkaDocumentSource(KafkaInputSettings(topics=("t",)), durable=lambda t: True)
        proc = _processor(first, pipeline, store)
        first._on_assign(None, PARTITION)
        _queue(first, docs[:100])  # start, descriptor, 98 points
        _turn(proc)
        proc.drain.set()
        proc._finish()  # the shutdown: every open run closed
        assert first.committable() == {TP: 0}  # held at the run's start: it comes again
        second = KafkaDocumentSource(KafkaInputSettings(topics=("t",)), durable=lambda t: True)
        proc = _processor(second, pipeline, store)  # the next daemon, the same store
        second._on_assign(None, PARTITION)
        _queue(second, docs)
        _turn(proc)
        assert store.flush(30)
        meta, rows = read_analysis(store, uid)
    assert meta["stop"]["exit_status"] == "success"
    assert (list(rows["seq_num"]), list(rows["index"])) == ([1], [0])
    assert "missing_stop" not in set(rows["reason"].dropna())  # the spectrum's row, analysed


def test_the_daemon_tells_its_processor_that_a_kafka_input_replays_open_runs(
    pipeline: Pipeline,
) -> None:
    from xasflow.daemon.config import DaemonConfig
    from xasflow.daemon.parts import Parts, build_processor

    made = []
    for kind in ("kafka", "zmq"):
        p = Parts()
        p.source = KafkaDocumentSource(KafkaInputSettings(topics=("t",)))  # type: ignore[assignment]
        p.assembler, p.pipeline = RunAssembler(), pipeline
        cfg = DaemonConfig.model_validate({"input": {"kind": kind}})
        made.append(build_processor(p, cfg, Counters(), [], lambda: None).replays_open_runs)
    assert made == [True, False]  # 0MQ: a run cut by a shutdown never comes again
