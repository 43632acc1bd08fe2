"""The dashboard in a real browser: Debian's chromium, headless, driven by playwright.

A daemon (tiny synthetic Cu K bundle of ``test_service``) on a loopback 0MQ forwarder; a
publisher sends a step scan, the page is opened, then a fly (quick-XAS) scan arrives: the
page must show the prediction and follow the new run. A screenshot is kept in
``test-artifacts/dashboard.png`` (git-ignored).

Needs the ``playwright`` Python package (no downloaded browsers: the system chromium is
used) and ``/usr/bin/chromium``; skipped with the install commands otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from helpers import (
    STEP_GRID,
    Harness,
    LoopbackProxy,
    analysis_run_docs,
    burst_docs,
    daemon_config,
    fly_scan,
    publish,
    step_scan,
    transmission,
    wait_for,
)

from xasflow import paths
from xasflow.daemon.dashboard_routes import STATIC_DIR
from xasflow.models.predictor import HERFD_SUSPECTED, OUT_OF_DOMAIN

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

CHROMIUM = os.environ.get("XASFLOW_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = paths.REPO_ROOT / "test-artifacts"
TIMEOUT_MS = 20_000
FLY_SPECTRA = 5

pytestmark = [
    pytest.mark.skipif(
        sync_playwright is None,
        reason="the playwright package is missing: .venv/bin/pip install playwright "
        "(no `playwright install`: the system chromium is used)",
    ),
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"no chromium at {CHROMIUM}: apt-get install -y chromium "
        "(or set XASFLOW_CHROMIUM to a chromium binary)",
    ),
]


@pytest.fixture(scope="module")
def beamline(
    models_dir: Path,
    shared_proxy: LoopbackProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Harness]:
    """The daemon with its dashboard, a publisher and a results subscriber, warmed up."""
    cfg = daemon_config(models_dir, shared_proxy, tmp_path_factory.mktemp("store"))
    h = Harness(cfg, shared_proxy)
    yield h
    h.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless chromium (the system one), closed after the module."""
    assert sync_playwright is not None
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            yield b
        finally:
            b.close()


def open_page(
    browser: Any, base: str, routes: dict[str, Any] | None = None
) -> tuple[Any, list[str], list[str]]:
    """A new tab on the dashboard, loaded, with the URLs it requested and its problems: console
    errors, uncaught exceptions, requests that failed or were refused, and a script that came
    as anything but JavaScript (a browser will not run such an ES module). ``routes``: URL
    pattern -> playwright route handler, in place before the page loads."""
    page = browser.new_page(viewport={"width": 1600, "height": 1150})
    for pattern, handler in (routes or {}).items():
        page.route(pattern, handler)
    requests: list[str] = []
    problems: list[str] = []

    def answered(r: Any) -> None:
        if r.status >= 400:
            problems.append(f"{r.status} {r.url}")
        elif r.request.resource_type == "script":
            kind = r.headers.get("content-type", "")
            if not kind.startswith("text/javascript"):
                problems.append(f"{r.url} came as {kind!r}")

    page.on("request", lambda r: requests.append(r.url))
    page.on("requestfailed", lambda r: problems.append(f"{r.url} failed: {r.failure}"))
    page.on("response", answered)
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(base + "/", wait_until="load")
    # the modules ran: the entry's state object is there, the stream connected
    page.wait_for_function(
        "() => window.xasflow !== undefined && window.xasflow.messages > 0", timeout=TIMEOUT_MS
    )
    return page, requests, problems


def drawn(page: Any) -> None:
    """Wait until the page has drawn the state it holds (on the next animation frame)."""
    page.wait_for_function(
        "v => document.body.dataset.version === String(v)",
        arg=page.evaluate("window.xasflow.state.version"),
        timeout=TIMEOUT_MS,
    )


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
        assert (head.locator(".note").text_content() or "").strip() == f"motif of CN {cn.value}"
        assert page.locator("#motifs li").nth(1).locator(".note").count() == 0
        assert "ood" in (page.get_attribute("#prediction-card", "class") or "")
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


def _health_rows(page: Any) -> dict[str, str]:
    """The page's health table as label -> shown value."""
    rows = page.evaluate(
        "() => Array.from(document.querySelectorAll('#health-table tr'))"
        ".map(tr => Array.from(tr.cells).map(td => td.textContent))"
    )
    return {r[0]: r[1] for r in rows if len(r) == 2}


def test_health_table_tells_the_stages_rejections_apart(beamline: Harness, browser: Any) -> None:
    """Before: the page's "spectra rejected" showed ``/health``'s ``spectra_rejected``, the
    sum of both stages, so a malformed document (refused by the assembler, never a spectrum)
    read as a rejected spectrum. Now the row shows the spectra the analysis rejected
    (received = analysed + those) and the assembly's rejections have a row of their own."""
    d, pub = beamline.daemon, beamline.pub
    assert d.http_url is not None

    def per_stage() -> dict[str, int]:  # from the counts by stage and reason
        by_reason = d.counters.snapshot()["rejected_by_stage"]
        return {s: sum(by_reason.get(s, {}).values()) for s in ("analysis", "assembly")}

    before = per_stage()["assembly"]
    pub("start", {"time": 1.0})  # no uid: the assembler rejects it (malformed_document)

    def counted() -> dict[str, int] | None:
        stages = per_stage()
        return stages if stages["assembly"] > before else None

    stages = wait_for(counted, "the malformed start to be rejected in assembly")
    page, _, problems = open_page(browser, d.http_url)
    try:
        page.wait_for_function(
            "n => { const h = window.xasflow.state && window.xasflow.state.health;"
            " return h && h.rejected_total === n; }",
            arg=stages["analysis"] + stages["assembly"],
            timeout=TIMEOUT_MS,
        )
        drawn(page)
        shown = _health_rows(page)
    finally:
        page.close()
    assert not problems, problems
    # the row that says "spectra rejected" counts the spectra, not the documents refused
    spectra = [v for label, v in shown.items() if label.startswith("spectra rejected")]
    assert spectra == [str(stages["analysis"])], shown
    assert shown["spectra rejected by the analysis"] == str(stages["analysis"])
    assert shown["rejected before the analysis (assembly)"] == str(stages["assembly"])


def test_rejected_per_second_counts_the_spectra_the_analysis_rejected(
    beamline: Harness, browser: Any
) -> None:
    """Before: the "rejected/s" shown beside "spectra/s" was the rate of all rejections, so
    documents the assembler refused (never spectra) read as rejected spectra. Now it is the
    analysis's rate, and the assembly's is shown apart, labelled."""
    d, pub = beamline.daemon, beamline.pub
    assert d.http_url is not None
    n_malformed = 10

    def stages() -> dict[str, int]:
        return d.counters.snapshot()["spectra_rejected_by_stage"]

    before = stages()
    page, _, problems = open_page(browser, d.http_url)
    try:
        page.wait_for_function(
            "() => document.getElementById('rates').textContent !== ''", timeout=TIMEOUT_MS
        )
        for _ in range(n_malformed):
            pub("start", {"time": 1.0})  # no uid: rejected by the assembler, never a spectrum
        target = before["assembly"] + n_malformed
        wait_for(lambda: stages()["assembly"] >= target, "the malformed starts to be rejected")
        # a state whose counters include them all, then the next one (sampled after them)
        version = page.wait_for_function(
            "n => { const s = window.xasflow.state;"
            " return s && s.health && s.health.rejected_per_stage.assembly >= n && s.version; }",
            arg=target,
            timeout=TIMEOUT_MS,
        ).json_value()
        page.wait_for_function(
            "v => window.xasflow.state.version > v", arg=version, timeout=TIMEOUT_MS
        )
        drawn(page)
        pill = page.text_content("#rates") or ""
        shown = _health_rows(page)
    finally:
        page.close()
    assert not problems, problems
    assert stages()["analysis"] == before["analysis"]  # no spectrum was rejected meanwhile
    m = re.fullmatch(
        r"([\d.]+) spectra/s · ([\d.]+) rejected/s · ([\d.]+) rejected in assembly/s", pill
    )
    assert m, pill
    assert m.group(2) == "0.0"  # the assembler's refusals are not rejected spectra
    assert float(m.group(3)) > 0
    assert shown["rejected by the analysis / s"] == "0.0"
    assert shown["rejected in assembly / s"] == m.group(3)


def test_ready_pill_does_not_outlive_the_health_report(beamline: Harness, browser: Any) -> None:
    """Before: when the daemon's health report failed (the state's ``health`` null), the page
    kept showing the last report's "daemon ready" and its tables, as if current. Now it says
    the health is unknown and shows no numbers it no longer has."""
    d = beamline.daemon
    assert d.http_url is not None
    dashboard = d.parts.app.state.dashboard
    real = dashboard.view

    class Failing:  # the daemon's view, but its health report fails
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def health(self) -> dict[str, Any]:
            raise RuntimeError("no health report (test)")

    page, _, problems = open_page(browser, d.http_url)
    try:
        page.wait_for_function(
            "() => document.getElementById('ready').textContent === 'daemon ready'",
            timeout=TIMEOUT_MS,
        )
        assert page.locator("#health-table tr").count() > 0
        dashboard.view = Failing()
        page.wait_for_function("() => window.xasflow.state.health === null", timeout=TIMEOUT_MS)
        drawn(page)
        pill = page.text_content("#ready")
        pill_class = page.get_attribute("#ready", "class")
        info = page.text_content("#health-info")
        shown = _health_rows(page)
        models = page.locator("#models-table td").count()
        reasons = page.locator("#reject-table td").count()
    finally:
        dashboard.view = real
        page.close()
    assert not problems, problems
    assert (pill, pill_class) == ("daemon health unknown", "pill warn")
    assert info == "no health report (see the daemon's log)"
    assert shown == {} and models == reasons == 0


def test_update_age_is_whole_seconds_then_minutes_then_hours(
    beamline: Harness, browser: Any
) -> None:
    """Before: the age beside "updated" was rounded, so 90 s read "2 min ago" and 59.6 s
    "60 s ago". Now it is floored: seconds below two minutes, whole minutes below two hours
    (a page left overnight read "900 min ago"), then whole hours."""
    d = beamline.daemon
    assert d.http_url is not None
    page, _, problems = open_page(browser, d.http_url)
    try:
        shown = page.evaluate(
            "() => import('./static/format.js').then(({ ago }) =>"
            " [0.4, 1, 59.6, 90, 119.9, 120, 150, 3599, 7199, 7200, 90000].map(ago))"
        )
    finally:
        page.close()
    assert not problems, problems
    assert shown == [
        "just now",
        "1 s ago",
        "59 s ago",
        "90 s ago",
        "119 s ago",
        "2 min ago",
        "2 min ago",
        "59 min ago",
        "119 min ago",
        "2 h ago",
        "25 h ago",
    ]


def test_page_reconnects_after_the_event_stream_is_refused(beamline: Harness, browser: Any) -> None:
    """Before: once ``/events`` answered an HTTP error (a 503 at ``http.max_sse_clients``),
    the browser closed the stream for good: the page said "disconnected", never tried again,
    and went on showing the last state as if current. Now it tries again after 1 s, doubling
    up to 30 s, says when, marks what it shows as not live, and is live once admitted."""
    d = beamline.daemon
    base = d.http_url
    assert base is not None
    dashboard, limit = d.parts.app.state.dashboard, d.parts.app.state.sse_limit
    maximum, refused = limit.maximum, limit.refused
    streams = 0

    def events(route: Any) -> None:
        # the page's first stream sends the daemon's state and ends, as all do when the
        # daemon stops; its later ones go to the daemon
        nonlocal streams
        streams += 1
        if streams > 1:
            route.fallback()
            return
        version, body = dashboard.message()
        text = f"retry: 2000\n\nid: {version}\nevent: state\ndata: {body}\n\n"
        route.fulfill(status=200, content_type="text/event-stream", body=text)

    limit.maximum = 0  # no room: every stream the daemon is asked for is answered 503
    try:
        page, _, problems = open_page(browser, base, {"**/events*": events})
        try:
            # (a playwright wait: route handlers run only while playwright waits)
            with page.expect_response(
                lambda r: r.url.startswith(base + "/events") and r.status == 503,
                timeout=TIMEOUT_MS,
            ):
                pass
            assert limit.refused > refused
            # refused, the page goes on trying and marks the state it shows as not live
            expect(page.locator("#conn")).to_have_text(
                re.compile(r"reconnecting in \d+ s"), timeout=TIMEOUT_MS
            )
            expect(page.locator("body")).to_have_class("stale", timeout=TIMEOUT_MS)
            expect(page.locator("#conn-stale")).to_be_visible()
            assert (page.text_content("#conn-stale") or "").startswith("not live: ")
            assert page.locator("#health-table tr").count() > 0  # the last state, still shown
            assert page.evaluate("window.xasflow.messages") == 1
            limit.maximum = maximum  # room again: the page's next try is admitted
            page.wait_for_function(
                "() => window.xasflow.messages > 1"
                " && document.getElementById('conn').textContent === 'live'",
                timeout=TIMEOUT_MS,
            )
            drawn(page)
            assert not page.is_visible("#conn-stale")
            assert "stale" not in (page.get_attribute("body", "class") or "")
            assert streams >= 3  # a try after the refused one
        finally:
            page.close()
    finally:
        limit.maximum = maximum
    # what went wrong on the page was the refused streams, and only that
    assert problems and all("/events" in p or "503" in p for p in problems), problems


#: The prediction card's fields that only a prediction fills (``renderPrediction``).
_PREDICTION_ONLY = (
    "pred-where", "cn-bars", "environment-set", "motifs", "valence-value", "valence-p",
    "valence-set", "valence-bars", "distance-value", "charge-value", "e0-value", "pred-flags",
)  # fmt: skip


def test_a_state_without_a_prediction_clears_the_card(beamline: Harness, browser: Any) -> None:
    """Before: a state without a prediction (an older pipeline's shape, or a restarted daemon
    before its first answer) left the last prediction's motifs, valence, distance, charge,
    E0 and bars on the card, beside the CN its published event gave. Now the card shows only
    what the state says: the event's CN and motif, or nothing."""
    d = beamline.daemon
    assert d.http_url is not None
    pred = {
        "raw_uid": "run-a",
        "index": 3,
        "e0": 8983.2,
        "environment": "O4",
        "motifs": [["square planar", 0.9], ["tetrahedral", 0.1]],
        "flags": ["noisy"],
        "tasks": {
            "cn": {"value": 4, "confidence": 0.9, "probabilities": {"4": 0.9, "6": 0.1}},
            "environment": {"value": "O4", "prediction_set": ["O4"]},
            "valence": {
                "value": "2",
                "confidence": 0.8,
                "probabilities": {"2": 0.8, "1": 0.2},
                "prediction_set": ["2"],
            },
            "distance": {"value": 1.95, "uncertainty": 0.02},
            "charge": {"value": 1.1, "uncertainty": 0.1},
        },
    }
    last = {"index": 0, "status": "ok", "cn": 6, "cn_probability": 0.7, "motif": "octahedral"}
    states = [
        {"prediction": pred, "run": {"raw_uid": "run-a", "n_ok": 1}, "last_rejection": None},
        {"prediction": None, "run": {"raw_uid": "run-b", "last": last, "n_ok": 1}},
        {"prediction": None, "run": None, "last_rejection": None},
    ]
    page, _, problems = open_page(browser, d.http_url)
    try:  # the three rendered at once: no state from the stream in between
        shown = page.evaluate(
            """([states, ids]) => import('./static/prediction.js').then(({ renderPrediction }) =>
                 states.map((state) => {
                   renderPrediction(state);
                   return Object.fromEntries(
                     ids.map((id) => [id, document.getElementById(id).textContent]));
                 }))""",
            [states, [*_PREDICTION_ONLY, "cn-value", "cn-p", "environment"]],
        )
    finally:
        page.close()
    assert not problems, problems
    assert all(shown[0][name] for name in _PREDICTION_ONLY), shown[0]
    assert {name: shown[1][name] for name in _PREDICTION_ONLY} == dict.fromkeys(
        _PREDICTION_ONLY, ""
    )
    assert (shown[1]["cn-value"], shown[1]["cn-p"], shown[1]["environment"]) == (
        "6",
        "p 70 %",
        "octahedral",
    )
    assert set(shown[2].values()) == {""}, shown[2]
