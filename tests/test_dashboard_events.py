"""The dashboard's event stream: SSE updates after real scans, throttling, the stream limit.

A real Daemon on a loopback 0MQ forwarder with the session's tiny synthetic Cu K bundle
(conftest); scans are composed with event-model and published as bluesky would. The SSE
stream is read from a raw socket (HTTP/1.0, so the body is the plain event stream), with
deadlines instead of sleeps.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")
pytest.importorskip("starlette")

from dashboard_helpers import DEADLINE_S, RATE_HZ, SSEClient, http_get
from helpers import (
    STEP_GRID,
    Harness,
    LoopbackProxy,
    burst_docs,
    fly_scan,
    publish,
    step_scan,
    transmission,
)

from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.dashboard import Dashboard
from xasflow.daemon.service import Daemon


def test_sse_pushes_the_prediction_and_spectrum_after_a_scan(dash: Harness) -> None:
    d = dash.daemon
    sse = SSEClient(d.http_url or "")
    try:
        assert sse.status == 200 and "text/event-stream" in sse.headers
        first = sse.next_state(time.monotonic() + DEADLINE_S)  # the current state at once
        assert first["health"]["ready"] is True
        assert [m["bundle_id"] for m in first["health"]["models"]] == [
            m["bundle_id"] for m in d.view.models()
        ]

        step_uid, step_docs = step_scan(STEP_GRID, transmission(STEP_GRID, shift=1.5))
        publish(dash.pub, step_docs)
        state, _ = sse.wait_for(
            lambda s: (
                (s["spectrum"] or {}).get("raw_uid") == step_uid
                and (s["run"] or {}).get("exit_status") == "success"
            )
        )
        manifest = d.parts.registry.get("Cu", "K").manifest  # type: ignore[union-attr]
        spec, pred, run = state["spectrum"], state["prediction"], state["run"]
        # the plotted arrays: raw mu on the scan's energies, normalised y on the model grid
        assert len(spec["energy"]) == len(spec["mu"]) == STEP_GRID.size
        assert spec["energy"] == pytest.approx(STEP_GRID, abs=2.0)  # aligned on the foil
        assert len(spec["grid"]) == len(spec["y"]) == manifest.prep.n_points
        assert spec["grid"][0] == pytest.approx(manifest.prep.window_start)
        assert spec["window"] == [manifest.prep.window_start, manifest.prep.window_stop]
        assert 8970.0 < spec["e0"] < 9000.0 and spec["energy_shift"] == pytest.approx(1.5, abs=0.3)
        latest = d.parts.pipeline.latest  # what the pipeline handed over, by reference
        assert (latest.raw_uid, latest.index) == (step_uid, 0)
        assert spec["y"] == pytest.approx(latest.prepared.y, abs=1e-4)
        assert spec["mu"] == pytest.approx(latest.prepared.spectrum.mu, abs=1e-4)
        assert spec["e0"] == pytest.approx(latest.prepared.e0)
        # regions clipped to the window, each with a share per task that has importances
        names = [r["name"] for r in spec["regions"]]
        assert names and set(names) <= set(manifest.regions)
        for r in spec["regions"]:
            assert manifest.prep.window_start <= r["start"] < r["stop"] <= manifest.prep.window_stop
            assert set(r["importance"]) == set(spec["tasks"])
            assert all(0.0 <= v <= 1.0 for v in r["importance"].values())
            assert r["max"] == pytest.approx(max(r["importance"].values()))
        # the prediction equals the published analysis event, with its uncertainties
        event = dash.results.wait([step_uid])[step_uid]["events"][0]
        assert pred["raw_uid"] == step_uid and pred["index"] == 0
        cn = pred["tasks"]["cn"]
        assert cn["value"] == event["cn"] and cn["confidence"] == pytest.approx(
            event["cn_probability"]
        )
        assert sum(cn["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert pred["tasks"]["distance"]["value"] == pytest.approx(event["distance"])
        assert pred["tasks"]["distance"]["uncertainty"] == pytest.approx(
            manifest.tasks["distance"].metrics["mae"]
        )
        # the tiny bundle's calibration rows are too few for a 90 % distance interval: its
        # quantile stands for infinity, and the page is told "unbounded", not +-1e6
        conf = manifest.tasks["distance"].conformal
        assert conf is not None and conf.qhat >= 1e6
        shown = pred["tasks"]["distance"]
        assert shown["coverage"] == pytest.approx(1 - conf.alpha)
        assert shown["interval_unbounded"] is True and "interval" not in shown
        assert pred["environment"] == event["motif"]
        ranked = json.loads(event["motif_ranking"])
        assert pred["motifs"] == [list(x) for x in ranked[: len(pred["motifs"])]]
        assert run["raw_uid"] == step_uid and run["kind"] == "step"
        assert (run["n_ok"], run["n_rejected"]) == (1, 0)
        assert state["runs"][0]["raw_uid"] == step_uid

        # a fly (quick-XAS) run: predictions over time within the run
        fly_e = np.linspace(8800.0, 9400.0, 1000)
        spectra = [transmission(fly_e, kind=k, seed=i) for i, k in enumerate(("CuO", "Cu2O") * 2)]
        fly_uid, fly_docs = fly_scan(fly_e, spectra)
        publish(dash.pub, fly_docs)
        state, _ = sse.wait_for(
            lambda s: (
                (s["run"] or {}).get("raw_uid") == fly_uid
                and s["run"]["exit_status"] is not None
                and (s["spectrum"] or {}).get("index") == 3
            )
        )
        hist = state["run"]["history"]
        assert state["run"]["kind"] == "fly" and hist["n"] == 4 and not hist["binned"]
        assert hist["index"] == [0, 1, 2, 3]
        events = dash.results.wait([fly_uid])[fly_uid]["events"]
        assert hist["cn"] == [e["cn"] for e in events]
        assert hist["distance"] == pytest.approx([e["distance"] for e in events], abs=1e-4)
        assert len(state["spectrum"]["energy"]) <= 800  # raw arrays decimated for the page
        assert state["runs"][0]["raw_uid"] == fly_uid and state["runs"][1]["raw_uid"] == step_uid
        h = state["health"]
        # the step scan's spectrum and the fly scan's four, nothing refused, nothing waiting
        assert h["analysed"] == d.counters.snapshot()["spectra_analysed"] == 5
        assert h["queue_depth"] == 0 and h["rejected"] == {}
        # /api/state gives the same view in one request
        status, _, body = http_get(f"{d.http_url}/api/state")
        assert status == 200 and json.loads(body)["run"]["raw_uid"] == fly_uid
    finally:
        sse.close()


def test_a_burst_of_2000_updates_is_coalesced(dash: Harness) -> None:
    d = dash.daemon
    dashboard: Dashboard = d.parts.app.state.dashboard
    sse = SSEClient(d.http_url or "")
    try:
        sse.next_state(time.monotonic() + DEADLINE_S)
        before = dashboard.stats()
        docs = burst_docs(2000, "burst-run")
        t0 = time.monotonic()
        for name, doc in docs:  # what the processing thread does per analysis document
            dashboard.listener(name, doc)
        state, n_messages = sse.wait_for(
            lambda s: (
                (s["run"] or {}).get("raw_uid") == "burst-run"
                and s["run"]["n_ok"] == 2000
                and s["run"]["exit_status"] == "success"
            )
        )
        elapsed = time.monotonic() - t0
    finally:
        sse.close()
    # at most one message per interval reached the client, however many updates came in
    assert n_messages <= math.ceil(elapsed * RATE_HZ) + 1, (n_messages, elapsed)
    assert n_messages < 2000 // 20
    after = dashboard.stats()
    assert after["documents"] - before["documents"] == len(docs)
    assert after["dropped"] == before["dropped"]  # nothing lost, only coalesced
    assert after["messages"] - before["messages"] <= math.ceil(elapsed * RATE_HZ) + 3
    hist = state["run"]["history"]
    assert hist["n"] == 2000 and hist["binned"] and len(hist["index"]) <= 400
    assert hist["index"][0] < 5 and hist["index"][-1] > 1990  # the whole run, averaged
    assert np.nanmean(hist["cn"]) == pytest.approx(3.0, abs=0.01)


def test_event_streams_beyond_the_limit_are_refused_and_counted(
    proxy: LoopbackProxy, tmp_path: Path
) -> None:
    """http.max_sse_clients: 2 streams are served, the 3rd gets 503 and is counted in /health
    and /metrics; once one closes, a new one is admitted. Queue limits show in /health."""
    cfg = DaemonConfig().with_updates(
        {
            "input": {"address": proxy.out_address, "queue_size": 500},
            "models": {"directory": str(tmp_path), "watch": False},
            "storage": {"directory": str(tmp_path / "store"), "max_queue": 700},
            "output": {"enabled": False},
            "http": {"port": 0, "max_sse_clients": 2},
        }
    )
    with Daemon(cfg) as daemon:
        url = daemon.http_url
        assert url is not None
        first, second = SSEClient(url), SSEClient(url)
        try:
            assert (first.status, second.status) == (200, 200)
            third = SSEClient(url)
            third.close()
            assert third.status == 503 and "retry-after: 5" in third.headers
            status, _, body = http_get(url + "/events")
            assert status == 503 and b"http.max_sse_clients" in body
            limits = json.loads(http_get(url + "/health")[2])["limits"]
            assert limits["sse_clients"] == {"max": 2, "open": 2, "refused": 2}
            assert limits["input_queue"] == {
                "max": 500,
                "depth": 0,
                "overflow": "block",
                "dropped": 0,
            }
            assert limits["store_queue"] == {
                "max": 700,
                "depth": 0,
                "dropped": 0,
                "full_wait_s": 0.0,
                "full_waits": 0,
            }
            assert limits["token_min_length"] == 16
            text = http_get(url + "/metrics")[2].decode()
            assert 'xasflow_limit_refused_total{limit="sse_clients"} 2.0' in text
            assert 'xasflow_limit{limit="sse_clients"} 2.0' in text
            assert 'xasflow_limit_used{limit="sse_clients"} 2.0' in text
            assert 'xasflow_limit{limit="input_queue"} 500.0' in text
            first.close()
            deadline = time.monotonic() + DEADLINE_S

            def open_streams() -> int:
                body = http_get(url + "/health")[2]
                return int(json.loads(body)["limits"]["sse_clients"]["open"])

            while open_streams() != 1:  # each poll is a request: no sleep needed
                assert time.monotonic() < deadline, "the closed stream was never released"
            fourth = SSEClient(url)
            try:
                assert fourth.status == 200
                assert fourth.next_state(time.monotonic() + DEADLINE_S)["health"]["ready"]
            finally:
                fourth.close()
        finally:
            first.close()
            second.close()
    assert daemon.counters.snapshot()["limit_refused"] == {"sse_clients": 2}
