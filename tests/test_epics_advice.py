"""Which raw run the IOC's advice PVs belong to (:mod:`xasflow.adapters.epics_advice`)."""

from __future__ import annotations

from xasflow.adapters.epics_advice import AdviceRuns


def test_a_superseded_runs_analysis_start_never_takes_the_advice_however_many_runs_came() -> None:
    """Run A's raw start, then many later raw starts (runs whose analysis had not started yet,
    e.g. a backlog of scans read before their spectra were analysed); then A's analysis start
    comes. Before: A was forgotten after 1,024 later raw starts and its analysis start then
    counted as one the hook never announced, so A took the advice PVs back from the run
    scanning. Now it is still a superseded run's start: nothing is cleared, the last run stays."""
    runs = AdviceRuns()
    runs.raw_start("raw-A")
    for k in range(1100):
        runs.raw_start(f"raw-{k}")
    assert runs.analysis_start("raw-A") is False
    assert runs.current == "raw-1099"
    assert not runs.may_advise("raw-A") and runs.may_advise("raw-1099")
    assert runs.analysis_start("raw-1099") is True  # the scanning run's own start: cleared


def test_an_analysis_start_the_hook_never_announced_takes_the_advice() -> None:
    """An IOC fed analysis documents only (no raw-start hook): each analysis start names the
    run the advice belongs to from then on."""
    runs = AdviceRuns()
    assert runs.analysis_start("raw-A") is True
    assert runs.analysis_start("raw-B") is True
    assert runs.current == "raw-B"
    assert not runs.may_advise("raw-A") and runs.may_advise("raw-B")


def test_a_run_replayed_from_its_start_is_the_current_one_again() -> None:
    """A raw start read again (a Kafka hand-over replays the run) makes its run current: its
    analysis start then clears the advice for it."""
    runs = AdviceRuns()
    runs.raw_start("raw-A")
    runs.raw_start("raw-B")
    assert runs.analysis_start("raw-A") is False
    runs.raw_start("raw-A")  # replayed
    assert runs.analysis_start("raw-A") is True
    assert runs.analysis_start("raw-B") is False  # B's late start: superseded
    assert runs.current == "raw-A"
