"""A bug while a batch is ended (``Pipeline.end``: the batched prediction, the results of the
preparation process) costs only the spectra it hit alone: the rest of the micro-batch, other
runs' spectra included, is analysed and published as usual."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")
pytest.importorskip("event_model")

from helpers import unpaged
from pipeline_helpers import (
    assert_a1_refused_alone,
    closed,
    opened,
    rows_by_run,
    scan,
    through_loop,
    two_runs,
    validate,
)

from xasflow.daemon import batch_prep
from xasflow.daemon import pipeline as pipeline_module
from xasflow.daemon.counters import Counters
from xasflow.daemon.pipeline import Pipeline
from xasflow.models.predictor import Predictor


def test_a_batched_prediction_that_fails_costs_only_the_spectrum_that_fails_alone(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the batched prediction (here the predictor hands back an iterator, not a
    list, for any batch holding raw-a/1) predicts the batch one spectrum at a time, so only
    raw-a/1 is refused (``internal_error``, counted as processing twice: the batch, then it
    alone). Before, the whole batch was lost: 0 events, 5 refused, neither run stopped."""
    real = Predictor.predict_prepared

    def predict_prepared(self: Predictor, prepared: list[Any]) -> Any:
        preds = real(self, prepared)
        hit = any(
            (p.spectrum.meta["raw_uid"], p.spectrum.meta["index"]) == ("raw-a", 1) for p in prepared
        )
        return iter(preds) if hit else preds

    monkeypatch.setattr(Predictor, "predict_prepared", predict_prepared)
    docs = two_runs(pipeline, counters)
    snap = counters.snapshot()
    assert_a1_refused_alone(docs, snap, "TypeError: object of type 'list_iterator' has no len()")
    assert snap["internal_errors"]["processing"] == 2
    assert pipeline.open_runs == []


def test_documents_that_cannot_be_paged_go_out_as_they_are(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug gathering a batch's events into pages publishes them one by one (counted as
    processing once): the documents were made and counted already, so nothing is lost or
    counted twice. Before, the batch was lost after its spectra were counted: 5 received,
    5 analysed and 5 more refused internal_error, nothing published."""

    def paged(docs: Any) -> Any:
        raise RuntimeError("a bug in paged")

    monkeypatch.setattr(pipeline_module, "paged", paged)
    docs = two_runs(pipeline, counters)
    validate(docs)
    assert [n for n, _ in docs].count("event") == 5 and "event_page" not in [n for n, _ in docs]
    assert rows_by_run(docs) == {
        "raw-a": [(i, "ok", "") for i in range(3)],
        "raw-b": [(i, "ok", "") for i in range(2)],
    }
    snap = counters.snapshot()
    assert snap["internal_errors"]["processing"] == 1
    assert (snap["spectra_received"], snap["spectra_analysed"]) == (5, 5)
    assert snap["rejected_by_stage"].get("analysis", {}) == {}


def _batch_fails(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The first batch's ``begin`` or ``end`` raises (a bug escaping the guards: its
    preparation's hand-over, its preparation's end)."""
    calls: list[int] = []
    if where == "begin":
        real_prepare = pipeline_module.prepare_works

        def prepare_works(*args: Any, **kw: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug in the batch")
            return real_prepare(*args, **kw)

        monkeypatch.setattr(pipeline_module, "prepare_works", prepare_works)
        return
    real_finish = batch_prep.Pending.finish

    def finish(self: batch_prep.Pending, *args: Any, **kw: Any) -> None:
        if self.done and not calls:  # end's call (begin's, with no process, prepared it)
            calls.append(1)
            raise RuntimeError("a bug in the batch")
        real_finish(self, *args, **kw)

    monkeypatch.setattr(batch_prep.Pending, "finish", finish)


@pytest.mark.parametrize("where", ["begin", "end"])
def test_a_failed_batch_records_its_spectra_and_stops_its_runs(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A batch whose processing raised all the same (a bug past the per-spectrum guards)
    records each of its spectra as refused (``internal_error``, received and rejected, so
    received = analysed + rejected holds) and stops its runs "fail" with the error. Before:
    nothing published, neither run ever stopped, received 0 against 5 rejected."""
    _batch_fails(monkeypatch, where)
    docs = two_runs(pipeline, counters)
    validate(docs)
    assert rows_by_run(docs) == {
        "raw-a": [(i, "rejected", "internal_error") for i in range(3)],
        "raw-b": [(i, "rejected", "internal_error") for i in range(2)],
    }
    details = {d["data"]["detail"] for n, d in unpaged(docs) if n == "event"}
    assert details == {"its batch failed: RuntimeError: a bug in the batch"}
    stops = [d for n, d in docs if n == "stop"]
    assert [(s["exit_status"], s["reason"], s["n_analysed"], s["n_rejected"]) for s in stops] == [
        ("fail", "internal_error: its batch failed: RuntimeError: a bug in the batch", 0, 3),
        ("fail", "internal_error: its batch failed: RuntimeError: a bug in the batch", 0, 2),
    ]
    snap = counters.snapshot()
    assert snap["internal_errors"] == {"processing": 1, "run_start": 0, "run_stop": 0}
    assert (snap["spectra_received"], snap["spectra_analysed"]) == (5, 0)
    assert snap["rejected_by_stage"]["analysis"] == {"internal_error": 5}
    assert snap["runs_closed"] == {"success": 2}  # the raw runs' own ends
    assert pipeline.open_runs == []


def test_a_run_hit_by_a_failed_batch_stops_fail_when_its_stop_comes_later(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose spectra were in a failed batch and whose stop comes in a later one stops
    "fail" with the error, its refused spectra counted in its stop. Before: "success" with
    1 analysed and none rejected, and received 1 against 2 rejected."""
    _batch_fails(monkeypatch, "end")
    docs = through_loop(
        pipeline,
        counters,
        [opened("raw-a"), scan("raw-a", 0, "CuCl"), scan("raw-a", 1, "CuCl")],
        [scan("raw-a", 2, "CuCl"), closed("raw-a", n=3)],
    )
    validate(docs)
    assert rows_by_run(docs) == {
        "raw-a": [
            (0, "rejected", "internal_error"),
            (1, "rejected", "internal_error"),
            (2, "ok", ""),
        ]
    }
    (stop,) = [d for n, d in docs if n == "stop"]
    assert (stop["exit_status"], stop["reason"], stop["n_analysed"], stop["n_rejected"]) == (
        "fail",
        "internal_error: its batch failed: RuntimeError: a bug in the batch",
        1,
        2,
    )
    snap = counters.snapshot()
    assert (snap["spectra_received"], snap["spectra_analysed"]) == (3, 1)
    assert snap["rejected_by_stage"]["analysis"] == {"internal_error": 2}
    assert pipeline.open_runs == []
    again = through_loop(pipeline, counters, [opened("raw-a"), scan("raw-a", 0), closed("raw-a")])
    assert [(n, d.get("exit_status")) for n, d in again][-1] == ("stop", "success")  # forgotten
