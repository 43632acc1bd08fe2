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
    through_loop,
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


def _break_start_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """``start_work`` raises for raw-a's spectrum 1 (a bug in its first steps)."""
    real = pipeline_module.start_work

    def start_work(scan: Any, *args: Any, **kw: Any) -> Any:
        _broken_at("raw-a", 1, [batch_prep.Work(scan)])
        return real(scan, *args, **kw)

    monkeypatch.setattr(pipeline_module, "start_work", start_work)


@pytest.mark.parametrize("where", ["spectrum", "preparation"])
def test_a_spectrum_that_fails_to_begin_costs_only_itself(
    pipeline: Pipeline, counters: Counters, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A bug while one spectrum is begun (its first steps, or the grouping of the batch's
    stacks, which is then tried one spectrum at a time) refuses that spectrum
    (``internal_error``, counted as processing) and publishes the rest of the batch. Before,
    the whole batch was lost: 5 spectra refused, 0 events published, neither run stopped."""
    if where == "spectrum":
        _break_start_work(monkeypatch)
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


#: what the assembler flags on a scan it put together with events missing
GAPS = ("seq_gap", "points_dropped")
_A = "seq_gap,points_dropped"  # as a row carries them


@pytest.mark.parametrize(
    ("where", "refused"),
    [
        ("spectrum", [(1, _A)]),
        ("run_start", [(0, _A), (1, _A), (2, _A)]),
        ("batch", [(0, _A), (1, _A), (2, _A), (0, ""), (1, "")]),
    ],
)
def test_a_refused_spectrum_keeps_its_scans_flags(
    pipeline: Pipeline,
    counters: Counters,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    refused: list[tuple[int, str]],
) -> None:
    """A spectrum refused whole (``internal_error``) by a bug in its first steps, in its run's
    start or in its whole batch keeps the flags the assembler gave its scan, so an operator
    reading the refused row still sees that events went missing (raw-a's spectra carry
    ``seq_gap`` and ``points_dropped``, raw-b's none). Before, a spectrum refused by begin's
    per-spectrum handler had no flags ("" for raw-a's spectrum 1)."""
    if where == "spectrum":
        _break_start_work(monkeypatch)
    elif where == "run_start":
        real_declarations = pipeline_module._declarations

        def declarations(start: dict[str, Any]) -> dict[str, Any]:
            if start["uid"] == "raw-a":
                raise RuntimeError("a bug in begin")
            return real_declarations(start)

        monkeypatch.setattr(pipeline_module, "_declarations", declarations)
    else:

        def prepare_works(*args: Any, **kw: Any) -> Any:
            raise RuntimeError("a bug in begin")

        monkeypatch.setattr(pipeline_module, "prepare_works", prepare_works)
    outputs = [
        opened("raw-a"),
        opened("raw-b"),
        *(scan("raw-a", i, "CuCl", flags=GAPS) for i in range(3)),
        *(scan("raw-b", i, "CuCl") for i in range(2)),
        closed("raw-a", n=3),
        closed("raw-b", n=2),
    ]
    docs = through_loop(pipeline, counters, outputs)
    validate(docs)
    rows = [d["data"] for n, d in unpaged(docs) if n == "event"]
    assert [(r["index"], r["flags"]) for r in rows if r["status"] == "rejected"] == refused
    assert {r["reason"] for r in rows if r["status"] == "rejected"} == {"internal_error"}
    assert counters.snapshot()["spectra_received"] == 5
