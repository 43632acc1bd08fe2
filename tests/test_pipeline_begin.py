"""A bug while a batch is begun (``Pipeline.begin``: a spectrum's first steps, a run's
declarations, the batch's preparation) costs only the spectrum or run it hit: the rest of the
micro-batch, other runs' spectra included, is analysed and published as usual."""

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
    two_runs,
    validate,
)

from xasflow.daemon import batch_prep
from xasflow.daemon import pipeline as pipeline_module
from xasflow.daemon.counters import Counters
from xasflow.daemon.pipeline import Pipeline


def _broken_at(raw_uid: str, index: int, works: list[Any]) -> None:
    if any(w.scan.raw_uid == raw_uid and w.scan.index == index for w in works):
        raise RuntimeError("a bug in begin")


@pytest.mark.parametrize("where", ["spectrum", "preparation"])
def test_a_spectrum_that_fails_to_begin_costs_only_itself(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A bug while one spectrum is begun (its first steps, or the grouping of the batch's
    stacks, which is then tried one spectrum at a time) refuses that spectrum
    (``internal_error``, counted as processing) and publishes the rest of the batch. Before,
    the whole batch was lost: 5 spectra refused, 0 events published, neither run stopped."""
    if where == "spectrum":
        real = pipeline_module.start_work

        def start_work(scan: Any, *args: Any, **kw: Any) -> Any:
            _broken_at("raw-a", 1, [batch_prep.Work(scan)])
            return real(scan, *args, **kw)

        monkeypatch.setattr(pipeline_module, "start_work", start_work)
    else:
        split = batch_prep._split_by_axis

        def split_by_axis(group: list[Any]) -> list[list[Any]]:
            _broken_at("raw-a", 1, group)
            return split(group)

        monkeypatch.setattr(batch_prep, "_split_by_axis", split_by_axis)
    docs = two_runs(pipeline, counters)
    snap = counters.snapshot()
    assert_a1_refused_alone(docs, snap, "RuntimeError: a bug in begin")
    # the batch's grouping failed once, then that spectrum's alone
    assert snap["internal_errors"]["processing"] == (1 if where == "spectrum" else 2)
    assert pipeline.open_runs == []


def test_a_run_whose_start_fails_to_begin_costs_only_that_run(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug reading what one run's start declares (HERFD, calculated) refuses that run's
    spectra (``internal_error``: analysed without the declaration they could be wrong), here
    and in later batches until its stop; the other run of the batch is analysed as usual."""
    real = pipeline_module._declarations

    def declarations(start: dict[str, Any]) -> dict[str, Any]:
        if start["uid"] == "raw-a":
            raise RuntimeError("a bug in begin")
        return real(start)

    monkeypatch.setattr(pipeline_module, "_declarations", declarations)
    docs = two_runs(pipeline, counters)
    validate(docs)
    assert rows_by_run(docs) == {
        "raw-a": [(i, "rejected", "internal_error") for i in range(3)],
        "raw-b": [(0, "ok", ""), (1, "ok", "")],
    }
    details = {d["data"]["detail"] for n, d in unpaged(docs) if n == "event"} - {""}
    assert details == {"its run's start failed: RuntimeError: a bug in begin"}
    snap = counters.snapshot()
    assert snap["internal_errors"]["processing"] == 1
    assert (snap["spectra_received"], snap["spectra_analysed"]) == (5, 2)
    assert snap["rejected_by_stage"]["analysis"] == {"internal_error": 3}
    monkeypatch.undo()  # forgotten with its run: its uid's next run is analysed again
    again = pipeline.handle_batch([opened("raw-a"), scan("raw-a", 0, "CuCl"), closed("raw-a")])
    assert rows_by_run(again) == {"raw-a": [(0, "ok", "")]}
