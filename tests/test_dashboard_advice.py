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
