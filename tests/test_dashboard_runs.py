"""The dashboard's digest of runs: memory bounds, runs on show and in the table, rates."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")
pytest.importorskip("starlette")

from helpers import burst_docs

from xasflow.daemon.dashboard import Dashboard


def test_dashboard_digest_bounds_memory() -> None:
    dashboard = Dashboard(None, rate_hz=10.0, inbox=100)
    for name, doc in burst_docs(250, "overflow"):  # more than the inbox holds: oldest dropped
        dashboard.listener(name, doc)
    assert dashboard.tick(build=True)
    stats = dashboard.stats()
    assert stats["documents"] == 253 and stats["digested"] == 100 and stats["dropped"] == 153
    big = Dashboard(None, rate_hz=10.0)
    for name, doc in burst_docs(45_000, "long"):  # decimated by 2 twice, whole run kept
        big.listener(name, doc)
    big.tick(build=False)
    run = big._runs["long"]
    index = run.column("index")
    assert run.n_ok == 45_000 and run.stride == 4 and index.size < 20_000
    assert index[0] == 0 and index[-1] >= 44_990 and np.all(np.diff(index) == 4)
    for i in range(25):  # only the most recent runs are kept
        for name, doc in burst_docs(1, f"r{i}"):
            big.listener(name, doc)
    _, text = big.message()
    state = json.loads(text)
    assert len(big._runs) == 20 and "long" not in big._runs
    assert [r["raw_uid"] for r in state["runs"]][:2] == ["r24", "r23"]


def test_a_run_still_open_stays_on_show_while_closed_ones_are_trimmed() -> None:
    """Before: the runs on show were trimmed to the last 20 started, oldest first, open or
    not: a run still scanning when 20 shorter ones had started after it was dropped, and
    its later spectra were ignored ("no longer on show")."""
    dashboard = Dashboard(None, rate_hz=10.0)
    start, desc, e0, e1, e2, stop = burst_docs(3, "scanning")
    for name, doc in (start, desc, e0):
        dashboard.listener(name, doc)
    for i in range(25):  # runs that start and end while it scans
        for name, doc in burst_docs(1, f"r{i}"):
            dashboard.listener(name, doc)
    for name, doc in (e1, e2):
        dashboard.listener(name, doc)
    _, text = dashboard.message()
    run = json.loads(text)["run"]
    assert (run["raw_uid"], run["n_ok"]) == ("scanning", 3)
    assert len(dashboard._runs) == 20 and "r5" not in dashboard._runs and "r6" in dashboard._runs
    dashboard.listener(*stop)  # closed now: the oldest, so the first to go
    for name, doc in burst_docs(1, "next"):
        dashboard.listener(name, doc)
    dashboard.tick(build=False)
    assert len(dashboard._runs) == 20 and "scanning" not in dashboard._runs


def test_the_runs_table_keeps_a_run_still_scanning_among_the_eight_shown() -> None:
    """Before: the table showed the last 8 runs started, so a run still scanning left it
    once 8 shorter runs had started after it (kept, and its panel live, but gone from the
    list). Now it takes the place of the oldest closed run shown, newest first still."""
    dashboard = Dashboard(None, rate_hz=10.0)
    start, desc, e0 = burst_docs(3, "scanning")[:3]
    for name, doc in (start, desc, e0):
        dashboard.listener(name, doc)
    for i in range(10):  # runs that start and end while it scans
        for name, doc in burst_docs(1, f"r{i}"):
            dashboard.listener(name, doc)
    _, text = dashboard.message()
    shown = [r["raw_uid"] for r in json.loads(text)["runs"]]
    assert shown == ["r9", "r8", "r7", "r6", "r5", "r4", "r3", "scanning"]


def test_runs_whose_stop_never_comes_are_bounded_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Runs kept open for want of their stop (lost in the inbox) stay bounded: past 200,
    the oldest leaves, logged."""
    dashboard = Dashboard(None, rate_hz=10.0)
    for i in range(201):
        start, desc = burst_docs(1, f"open{i}")[:2]
        dashboard.listener(*start)
        dashboard.listener(*desc)
    with caplog.at_level("WARNING", logger="xasflow.daemon.dashboard"):
        dashboard.tick(build=False)
    assert len(dashboard._runs) == 200 and "open0" not in dashboard._runs
    assert "open1" in dashboard._runs and "run open0, with no stop seen" in caplog.text


def test_rejection_rates_are_split_by_stage() -> None:
    """Before: ``rates.rejected_per_s``, shown as "rejected/s" beside "spectra/s", counted the
    assembler's refused documents with the spectra the analysis rejected. Now each stage has
    its own rate: the analysis's (spectra) and the assembly's (documents and runs)."""
    from xasflow.daemon.counters import Counters

    now = [100.0]

    class Running:  # the members of a DaemonView the dashboard reads
        counters = Counters()
        delivered = 0

        def input_stats(self) -> dict[str, int]:
            return {"delivered": self.delivered}

        def health(self) -> dict[str, Any]:
            return {"counters": self.counters.snapshot()}

    view = Running()
    dashboard = Dashboard(view, rate_hz=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    dashboard.tick(build=True)
    view.counters.spectrum_analysed(8)
    view.counters.reject("weak_edge", stage="analysis", n=2)
    view.counters.reject("malformed_document", stage="assembly", n=10)
    view.delivered = 40
    now[0] += 2.0
    dashboard.tick(build=True)
    _, text = dashboard.message()
    assert json.loads(text)["rates"] == {
        "analysed_per_s": 4.0,
        "analysis_rejected_per_s": 1.0,  # spectra: what "rejected/s" beside "spectra/s" means
        "assembly_rejected_per_s": 5.0,  # documents and runs, never spectra
        "documents_per_s": 20.0,
    }
    health = json.loads(text)["health"]
    assert health["rejected_per_stage"] == {"analysis": 2, "assembly": 10}


def test_the_latest_spectrums_views_are_made_only_for_a_message(monkeypatch) -> None:
    """With no page connected the dashboard digests documents but makes no views of the
    latest spectrum (a fly scan offers a new one every batch); the next message shows the
    newest offered, made once."""
    import xasflow.daemon.dashboard as dash

    made: list[Any] = []

    def views(latest: Any, cache: dict) -> tuple[dict, dict]:
        made.append(latest)
        return {"index": latest}, {"cn": latest}

    monkeypatch.setattr(dash, "latest_views", views)
    dashboard = Dashboard(None, rate_hz=10.0)
    for i in range(5):  # batches analysed while nobody watches
        dashboard.offer_latest(i)
        assert not dashboard.tick()
    assert made == []
    _, text = dashboard.message()
    assert made == [4] and json.loads(text)["spectrum"] == {"index": 4}
    dashboard.tick(build=True)  # nothing new offered: the views are not made again
    assert made == [4]
