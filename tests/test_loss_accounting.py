"""Loss accounting of raw events: what a raw stop may claim missing, an input-queue drop
counted once, and raw metadata the analysis run carries onward.

Each test failed before its fix (the docstring says what the code did then)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from event_model import compose_run

from xasflow.adapters.recovery import InterruptedRuns
from xasflow.adapters.stop_claims import MAX_STOP_MISSING
from xasflow.daemon.assembly import Rejected, RunAssembler, RunClosed
from xasflow.daemon.counters import Counters
from xasflow.daemon.pipeline import Pipeline
from xasflow.daemon.registry import ModelRegistry

KEYS = ("energy", "I0", "It")


def step_run(n: int, **stop: Any) -> tuple[str, list[tuple[str, dict]]]:
    """A step scan of ``n`` points (seq_nums 1..n) whose stop carries ``stop``."""
    run = compose_run(metadata={"element": "Cu", "edge": "K"})
    keys = {k: {"source": "sim", "dtype": "number", "shape": []} for k in KEYS}
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    docs: list[tuple[str, dict]] = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for i in range(n):
        e = 8900.0 + 10 * i
        data = {"energy": e, "I0": e / 10, "It": e / 100}
        docs.append(("event", desc.compose_event(data=data, timestamps=dict.fromkeys(KEYS, 1.0))))
    docs.append(("stop", {**run.compose_stop(), **stop}))
    return run.start_doc["uid"], docs


def analysis(tmp_path: Path) -> tuple[Pipeline, Counters]:
    """A pipeline with no bundle (every spectrum is rejected ``no_model``) and its counters."""
    counters = Counters()
    (tmp_path / "models").mkdir()
    registry = ModelRegistry(tmp_path / "models", counters)
    return Pipeline(registry, counters, validate=True), counters


def feed(asm: RunAssembler, docs: list[tuple[str, dict]]) -> list[Any]:
    return [o for name, doc in docs for o in asm.feed(name, doc)]


# --------------------------------------------------------------------------- 1. num_events

HOSTILE_NUM_EVENTS: list[Any] = [
    {"primary": 2**70},  # beyond int64
    {"primary": 2**63},  # just beyond int64 (seq_nums are refused there too)
    {"primary": 3 + MAX_STOP_MISSING + 1},  # an int64, but more missing than one stop may claim
    {"primary": -1},
    {"primary": 5.0},
    {"primary": "5"},
    {"primary": {"a": 1}},
    {"primary": None},
    {"primary": [5]},
    5,  # num_events itself not a mapping
    "primary",
]


@pytest.mark.parametrize("num_events", HOSTILE_NUM_EVENTS, ids=repr)
def test_a_stop_cannot_claim_implausible_missing_events(num_events: Any) -> None:
    """Before: a stop's ``num_events`` was trusted: ``{"primary": 2**70}`` after 3 events
    made ``RunClosed.missing_events`` 2**70 - 3 (then the ``seq_gap`` loss counter and the
    analysis stop's ``raw_missing_events``), and a malformed value was ignored without a
    word. Now such a claim adds nothing and is refused visibly (``malformed_document``)."""
    uid, docs = step_run(3, num_events=num_events)
    out = feed(RunAssembler(), docs)
    (closed,) = [o for o in out if isinstance(o, RunClosed)]
    assert (closed.seq_gaps, closed.missing_events) == (0, 0)
    refused = [o for o in out if isinstance(o, Rejected)]
    assert [(r.raw_uid, r.reason) for r in refused] == [(uid, "malformed_document")]
    assert "num_events" in refused[0].detail


def test_a_bool_num_events_is_not_one_event() -> None:
    """Before: ``True`` is an ``int``: a stop with ``{"primary": True}`` after a descriptor
    but no event counted one missing event."""
    _, docs = step_run(0, num_events={"primary": True})
    out = feed(RunAssembler(), docs)
    (closed,) = [o for o in out if isinstance(o, RunClosed)]
    assert closed.missing_events == 0
    assert any(isinstance(o, Rejected) and "num_events" in o.detail for o in out)


def test_a_plausible_num_events_still_reveals_trailing_losses() -> None:
    """The bound keeps what a real stop says: up to ``MAX_STOP_MISSING`` events beyond the
    last seen, and a numpy integer (a pickled stop) like an int."""
    np = pytest.importorskip("numpy")
    for claim, missing in ((5, 2), (np.int64(6), 3), (3 + MAX_STOP_MISSING, MAX_STOP_MISSING)):
        _, docs = step_run(3, num_events={"primary": claim, "baseline": 2})
        out = feed(RunAssembler(), docs)
        (closed,) = [o for o in out if isinstance(o, RunClosed)]
        assert (closed.seq_gaps, closed.missing_events) == (1, missing)
        assert not [o for o in out if isinstance(o, Rejected)]


class _Store:
    def __init__(self) -> None:
        self.finished: list[dict] = []

    def finish_run(self, raw_uid: str, stop: dict) -> None:
        self.finished.append(stop)


@pytest.mark.parametrize(
    "num_events", [{"primary": 2**70}, {"primary": 2 + MAX_STOP_MISSING + 1}, {"primary": True}]
)
def test_an_interrupted_runs_stop_cannot_claim_implausible_losses(num_events: Any) -> None:
    """Before: a run left open by a killed daemon was closed with ``raw_missing_events`` =
    the raw stop's ``num_events`` - the spectra stored, trusted as is (2**70 went into the
    ``interrupted`` loss counter and the store). Now such a count is unknown (None)."""
    store = _Store()
    runs = InterruptedRuns(store)
    runs._open["raw-1"] = {
        "raw_uid": "raw-1",
        "start": {"uid": "an-1"},
        "descriptor": {"name": "primary"},
        "rows": 2,
        "spectra": 2,
        "n_ok": 2,
        "n_rejected": 0,
    }
    stop = runs.close("raw-1", {"exit_status": "success", "num_events": num_events})
    assert stop is not None and stop["raw_missing_events"] is None
    assert "num_events" in stop["reason"]
    assert store.finished == [stop]


def test_a_refused_num_events_reaches_no_loss_counter_nor_the_analysis_stop(
    tmp_path: Path,
) -> None:
    """End to end through the pipeline: the hostile stop of ``test_a_stop_cannot_claim...``
    leaves ``events_lost`` at 0 and the analysis stop whole; its refusal is counted."""
    _, docs = step_run(3, num_events={"primary": 2**70})
    pipeline, counters = analysis(tmp_path)
    out = pipeline.handle_batch(feed(RunAssembler(), docs))
    (stop,) = [doc for name, doc in out if name == "stop"]
    assert (stop["raw_missing_events"], stop["partial"]) == (0, False)
    snap = counters.snapshot()
    assert snap["events_lost_total"] == 0
    assert snap["rejected_by_stage"]["assembly"] == {"malformed_document": 1}
