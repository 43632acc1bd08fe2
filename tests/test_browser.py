"""The dashboard in a real browser (:mod:`browser_page`): a daemon (tiny synthetic Cu K
bundle of ``conftest``) on a loopback 0MQ forwarder; a publisher sends a step scan, the
page is opened, then a fly (quick-XAS) scan arrives: the page must show the prediction and
follow the new run. A screenshot is kept in ``test-artifacts/dashboard.png`` (git-ignored).
The page's panels one by one are in ``test_browser_panels``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from browser_page import BROWSER_MARKS, TIMEOUT_MS, drawn, open_page
from helpers import (
    STEP_GRID,
    Harness,
    analysis_run_docs,
    burst_docs,
    fly_scan,
    publish,
    step_scan,
    transmission,
)

from xasflow import paths
from xasflow.daemon.dashboard_routes import STATIC_DIR
from xasflow.models.predictor import HERFD_SUSPECTED, OUT_OF_DOMAIN

ARTIFACTS = paths.REPO_ROOT / "test-artifacts"
FLY_SPECTRA = 5

pytestmark = BROWSER_MARKS


def test_dashboard_shows_predictions_and_follows_new_scans(beamline: Harness, browser: Any) -> None:
    d, pub = beamline.daemon, beamline.pub
    base = d.http_url
    assert base is not None
    # a step scan is analysed before anyone looks
    step_uid, step_docs = step_scan(STEP_GRID, transmission(STEP_GRID, shift=1.0))
    publish(pub, step_docs)
    step_event = beamline.results.wait([step_uid])[step_uid]["events"][0]
    assert step_event["status"] == "ok"

    page, requests, problems = open_page(browser, base)
    try:
        # the page loads and shows the step scan's prediction
        page.wait_for_function(
            "uid => document.getElementById('run-uid').textContent === uid.slice(0, 8)"
            " && document.getElementById('cn-value').textContent.trim() !== ''",
            arg=step_uid,
            timeout=TIMEOUT_MS,
        )
        assert page.text_content("#cn-value") == str(step_event["cn"])
        assert page.text_content("#environment") == step_event["motif"]
        assert page.text_content("#conn") == "live"
        assert "step scan" in (page.text_content("#run-info") or "")
        assert page.locator("#cn-bars .bar").count() >= 2  # class probabilities drawn
        # the valence's bars are labelled as the valence is shown, signed ("+2", not "2")
        classes = page.evaluate(
            "Object.keys(window.xasflow.state.prediction.tasks.valence.probabilities)"
        )
        labels = page.locator("#valence-bars .bar > span:first-child").all_text_contents()
        assert len(classes) >= 2 and labels == [c if int(c) <= 0 else f"+{c}" for c in classes]
        assert page.text_content("#valence-value") in labels
        assert page.locator("#motifs li").count() >= 1
        assert "±" in (page.text_content("#distance-value") or "")
        assert page.locator("#models-table td").first.text_content()
        shading = page.locator("#task-buttons button")
        assert shading.count() >= 2
        task = shading.nth(1).get_attribute("data-task")
        shading.nth(1).click()  # shade the regions that matter for one task
        page.wait_for_function(  # the buttons may be redrawn by a state arriving meanwhile
            "t => { const b = document.querySelector(`#task-buttons button[data-task='${t}']`);"
            " return b !== null && b.classList.contains('active'); }",
            arg=task,
            timeout=TIMEOUT_MS,
        )
        assert page.evaluate("window.xasflow.shading") == task
        messages_before = page.evaluate("window.xasflow.messages")

        # a quick-XAS run arrives: the page follows it and plots predictions over time
        fly_e = np.linspace(8800.0, 9400.0, 1000)
        spectra = [
            transmission(fly_e, shift=-0.5, kind=("CuO", "Cu2O")[i % 2], seed=i)
            for i in range(FLY_SPECTRA)
        ]
        # markup in document data (it comes from the network) is shown as text, never parsed
        sample = 'CuO/Cu2O <img src=x onerror="window.xasflowHacked = 1"> mixture'
        fly_uid, fly_docs = fly_scan(fly_e, spectra, {"sample_name": sample})
        publish(pub, fly_docs)
        fly_events = beamline.results.wait([fly_uid])[fly_uid]["events"]
        page.wait_for_function(
            "([uid, n]) => { const s = window.xasflow.state;"
            " return document.getElementById('run-uid').textContent === uid.slice(0, 8)"
            " && s && s.run.history.n === n && s.run.exit_status === 'success'"
            " && s.spectrum.raw_uid === uid && s.spectrum.index === n - 1; }",
            arg=[fly_uid, FLY_SPECTRA],
            timeout=TIMEOUT_MS,
        )
        drawn(page)
        info = page.text_content("#run-info") or ""
        assert info.startswith("fly scan") and f"{FLY_SPECTRA} analysed, 0 rejected" in info
        assert f"fly scan of {sample} · " in info
        assert page.locator("#runs-table tr").nth(1).locator("td").nth(2).text_content() == sample
        assert page.locator("main img").count() == 0
        assert page.evaluate("window.xasflowHacked") is None
        assert page.text_content("#cn-value") == str(fly_events[-1]["cn"])
        # the tiny bundle's distance interval is unbounded (too few calibration rows)
        assert (page.text_content("#distance-value") or "").endswith("(90 %: unbounded)")
        assert page.evaluate("window.xasflow.state.run.history.cn") == [e["cn"] for e in fly_events]
        assert page.evaluate("window.xasflow.messages") > messages_before
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)  # kept for people, asserted above

        # a burst of 2,000 updates (a 500 spectra/s stream for 4 s): coalesced by the
        # daemon, the page gets a few states and stays responsive
        messages_before = page.evaluate("window.xasflow.messages")
        t0 = time.monotonic()
        for name, doc in burst_docs(2000, "burst-run"):
            d.parts.app.state.dashboard.listener(name, doc)
        page.wait_for_function(
            "() => { const s = window.xasflow.state;"
            " return s && s.run.raw_uid === 'burst-run' && s.run.n_ok === 2000"
            " && s.run.exit_status === 'success'; }",
            timeout=TIMEOUT_MS,
        )
        elapsed = time.monotonic() - t0
        received = page.evaluate("window.xasflow.messages") - messages_before
        assert 1 <= received <= math.ceil(elapsed * d.config.http.dashboard_rate_hz) + 2
        assert page.evaluate("window.xasflow.state.run.history.index.length") <= 400
        assert page.text_content("#run-uid") == "burst-ru"

        # an out-of-domain answer is flagged over the prediction, with its conformal set,
        # and a run that lost raw events says so in the run table
        dashboard = d.parts.app.state.dashboard
        latest = d.parts.pipeline.latest
        cn = latest.prediction.results["cn"]
        # the ranking led by the motif of the CN answered, which its regressor scores low
        led = [(f"CN{cn.value}-led", 0.01), ("CN9-other", 0.4)]
        doubt = dataclasses.replace(
            latest.prediction,
            flags=[*latest.prediction.flags, OUT_OF_DOMAIN, HERFD_SUSPECTED],
            ood_score=7.5,
            results={
                **latest.prediction.results,
                "cn": dataclasses.replace(cn, prediction_set=[2, 4]),
                "valence": dataclasses.replace(
                    latest.prediction.results["valence"], prediction_set=[1, 2]
                ),
                "environment": dataclasses.replace(
                    latest.prediction.results["environment"],
                    prediction_set=["CN4-tetrahedral", "CN4-square-planar"],
                ),
                "motifs": dataclasses.replace(latest.prediction.results["motifs"], ranking=led),
            },
        )
        dashboard.offer_latest(dataclasses.replace(latest, prediction=doubt))
        row = {"index": 0, "status": "ok", "cn": 4, "out_of_domain": True, "cn_set": "2,4"}
        lossy = {"exit_status": "fail", "partial": True, "raw_missing_events": 3}
        for name, doc in analysis_run_docs([("primary", row)], "ood-run", stop=lossy):
            dashboard.listener(name, doc)
        page.wait_for_function(
            "() => !document.getElementById('ood-banner').hidden"
            " && document.getElementById('run-uid').textContent === 'ood-run'",
            timeout=TIMEOUT_MS,
        )
        assert "OUT OF DOMAIN" in (page.text_content("#ood-banner") or "")
        assert "not to be trusted" in (page.text_content("#ood-banner") or "")
        assert "looks like HERFD" in (page.text_content("#ood-banner") or "")  # the daemon's hint
        assert page.text_content("#cn-set") == "90 % set {2, 4}"
        assert page.text_content("#valence-set") == "90 % set {+1, +2}"  # every set shown
        # the CN-motif set is cut to the CN set: it shows the coverage it measured as served
        env_level = round(100 * latest.manifest.set_coverage("environment"))
        assert page.text_content("#environment-set") == (
            f"{env_level} % set {{CN4-tetrahedral, CN4-square-planar}}"
        )
        head = page.locator("#motifs li").first
        note = (head.locator(".note").text_content() or "").strip()
        assert note == f"the environment answer, chosen for CN {cn.value}"
        assert page.locator("#motifs li").nth(1).locator(".note").count() == 0
        assert "ood" in (page.get_attribute("#prediction-card", "class") or "")
        # the model's answers struck through in red (a line the colour of the digits was lost
        # in the crossbar of a large "4"); E0, read from the spectrum, stays as it is
        style = "([id, key]) => getComputedStyle(document.getElementById(id))[key]"
        red = page.evaluate(style, ["ood-banner", "color"])  # the banner's colour: --bad
        for value in ("cn-value", "environment", "valence-value", "distance-value"):
            assert page.evaluate(style, [value, "textDecorationLine"]) == "line-through"
            assert page.evaluate(style, [value, "textDecorationColor"]) == red
            assert page.evaluate(style, [value, "color"]) != red
        assert page.evaluate(style, ["e0-value", "textDecorationLine"]) == "none"
        # the prediction, the tallest card, stands beside both the spectrum and the run (in a
        # row of its own it stretched the spectrum's card to its height, half of it empty)
        box = page.evaluate(
            "() => Object.fromEntries(['spectrum-card', 'run-card', 'prediction-card'].map("
            "id => { const r = document.getElementById(id).getBoundingClientRect();"
            " return [id, [r.top, r.bottom]]; }))"
        )
        spectrum, run, prediction = box["spectrum-card"], box["run-card"], box["prediction-card"]
        assert prediction[0] == spectrum[0] and run[0] > spectrum[1]
        assert prediction[1] >= run[1]
        first = page.locator("#runs-table tr").nth(1).locator("td")
        assert first.nth(0).text_content() == "ood-run"
        assert first.nth(5).text_content() == "1"  # out-of-domain answers in the run
        assert first.nth(6).text_content() == "fail (3 lost)"
        assert "3 raw events lost" in (page.text_content("#run-info") or "")

        assert not page.is_visible("#pred-stale")  # the answer is the current run's
        # a newer run with only a rejected spectrum: the answer shown is still the older
        # run's, labelled so, and takes no flags or latency from the other run's row
        refused = {
            "index": 0,
            "status": "rejected",
            "reason": "weak_edge",
            "flags": "foil_misaligned",
            "latency_ms": 987.0,
        }
        *going, stop = analysis_run_docs([("primary", refused)], "refused-run")
        for name, doc in going:  # its stop comes later
            dashboard.listener(name, doc)
        page.wait_for_function(
            "() => document.getElementById('run-uid').textContent === 'refused-'",
            timeout=TIMEOUT_MS,
        )
        drawn(page)
        notes = page.text_content("#pred-flags") or ""
        assert "foil_misaligned" not in notes and "987" not in notes
        assert "out_of_domain" in notes  # the shown prediction's own flags stay
        # ... and the card says it is an earlier run's, dimmed, with why the new one has none
        stale = page.text_content("#pred-stale") or ""
        assert page.is_visible("#pred-stale")
        assert stale.startswith(f"from an earlier run ({latest.raw_uid[:8]})")
        assert "run refused- has no answer yet, 1 rejected (last: weak_edge)" in stale
        assert "stale" in (page.get_attribute("#prediction-card", "class") or "")
        # once that run has ended the card no longer says an answer may yet come
        dashboard.listener(*stop)
        page.wait_for_function(
            "() => window.xasflow.state.run.exit_status === 'success'", timeout=TIMEOUT_MS
        )
        drawn(page)
        assert page.text_content("#pred-stale") == (
            f"from an earlier run ({latest.raw_uid[:8]}): "
            "run refused- ended with no answer, 1 rejected (last: weak_edge)"
        )
    finally:
        page.close()
    assert not problems, problems
    # everything the page loaded came from the daemon itself, every module of it among them
    assert requests and all(u.startswith(base + "/") for u in requests), requests
    scripts = {u.removeprefix(base + "/static/") for u in requests if u.endswith(".js")}
    assert scripts == {p.name for p in STATIC_DIR.glob("*.js")}
