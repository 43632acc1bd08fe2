"""The dashboard's view of a run's latest advice: what the recommendations event says."""

from __future__ import annotations

import json

from xasflow.daemon.dashboard_views import recommendation_view


def test_the_view_carries_regions_left_outside_the_monochromators_range() -> None:
    """The event's ``dropped`` (regions wholly outside ``recommender.mono_range``) reaches the
    page decoded, beside the regions to measure; before, the view left it out and the page
    never said a region was not measured."""
    kept = {"name": "edge", "start": 8970.0, "stop": 9000.0, "step": 0.5, "dwell": 1.0}
    gone = {**kept, "name": "exafs", "start": 9100.0, "stop": 9400.0, "reason": "outside"}
    data = {
        "index": 2,
        "n_points": 61,
        "scan_time": 61.0,
        "stop_early": False,
        "stop_reason": "withheld by seq_gap in this spectrum (events of the run went missing)",
        "regions": json.dumps([kept]),
        "rescan": "",
        "dropped": json.dumps([gone]),
    }
    view = recommendation_view(data)
    assert view is not None
    assert view["regions"] == [kept]
    assert view["dropped"] == [gone]
    assert view["stop_reason"].startswith("withheld by seq_gap")


def test_an_event_from_before_dropped_existed_has_none() -> None:
    """A recommendations event without the key (an older daemon's, read back) drops nothing."""
    view = recommendation_view({"index": 0, "regions": "[]", "rescan": ""})
    assert view is not None and view["dropped"] == []


def test_the_health_view_says_whether_a_bundle_serves() -> None:
    """The page's health view carries /health's ``serving`` beside ``ready``: a daemon whose
    bundles were all refused is ready (it runs on) but serves nothing."""
    from xasflow.daemon.dashboard_views import health_view

    view = health_view({"ready": True, "serving": False, "counters": {}})
    assert (view["ready"], view["serving"]) == (True, False)


def test_the_run_history_marks_out_of_domain_answers() -> None:
    """The run's history keeps, per spectrum, whether its answer was out of domain (the page
    draws those apart); before, its CN looked like a trusted one. Rejected spectra have no
    answer to mark (null)."""
    from xasflow.daemon.dashboard_views import RunView

    run = RunView(raw_uid="raw-1")
    for i, (status, ood) in enumerate([("ok", False), ("ok", True), ("rejected", False)]):
        run.add({"status": status, "index": i, "cn": 4, "out_of_domain": ood}, float(i))
    history = run.history()
    assert history["out_of_domain"] == [0.0, 1.0, None]
    assert history["cn"] == [4.0, 4.0, 4.0]
