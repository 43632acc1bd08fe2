"""The dashboard's panels in a real browser (:mod:`browser_page`), each against the state it
is given: the health table and its rates, the ready pill, the update's age, the event
stream's reconnection, the prediction card, and the recommendation.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from browser_page import BROWSER_MARKS, TIMEOUT_MS, drawn, open_page
from helpers import (
    Harness,
    wait_for,
)

try:
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover - depends on the machine (BROWSER_MARKS skips)
    expect = None

pytestmark = BROWSER_MARKS


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
        dashboard.tick(build=True)  # the next page gets the real report, not the failed one
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
        dashboard.tick(build=True)  # the daemon's state now, whatever an earlier test left
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
            drawn(page)  # on an animation frame, which can come after the page went stale
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


def test_page_says_its_state_is_stale_while_a_part_hangs(
    beamline: Harness, browser: Any, monkeypatch: Any
) -> None:
    """Before: when a part hung in the daemon's health report, the dashboard built no new
    state while the stream stayed open (keep-alives only): the page said "live" and showed
    the last state as current. Now the stream sends ``stale`` once the newest state is
    STALE_AFTER_S old: the pill says "stalled", the state is marked not live with its age,
    and the page is live again once the part answers."""
    from xasflow.daemon import dashboard as dashboard_module

    monkeypatch.setattr(dashboard_module, "STALE_AFTER_S", 1.0, raising=False)
    d = beamline.daemon
    assert d.http_url is not None
    dashboard = d.parts.app.state.dashboard
    real = dashboard.view
    entered, release = threading.Event(), threading.Event()

    class Hanging:  # the daemon's view, but its health report hangs until released
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def health(self) -> dict[str, Any]:
            entered.set()
            release.wait(60)
            return real.health()  # type: ignore[no-any-return]

    page, _, problems = open_page(browser, d.http_url)
    try:
        expect(page.locator("#conn")).to_have_text("live", timeout=TIMEOUT_MS)
        dashboard.view = Hanging()
        assert entered.wait(20)  # the dashboard's own thread, in the part
        expect(page.locator("#conn")).to_have_text("stalled", timeout=TIMEOUT_MS)
        expect(page.locator("body")).to_have_class("stale", timeout=TIMEOUT_MS)
        note = page.text_content("#conn-stale") or ""
        assert page.locator("#health-table tr").count() > 0  # the last state, still shown
        messages = page.evaluate("window.xasflow.messages")
        dashboard.view = real
        release.set()  # the part answers again
        page.wait_for_function(
            f"() => window.xasflow.messages > {messages}"
            " && document.getElementById('conn').textContent === 'live'",
            timeout=TIMEOUT_MS,
        )
        drawn(page)
        assert not page.is_visible("#conn-stale")
        assert "stale" not in (page.get_attribute("body", "class") or "")
    finally:
        dashboard.view = real
        release.set()
        page.close()
    assert not problems, problems
    assert note.startswith("not live: the daemon's state is not being updated"), note


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


def test_the_recommendation_says_why_it_does_not_stop_and_what_it_leaves_out(
    beamline: Harness, browser: Any
) -> None:
    """Before: the panel said nothing when stop-early was withheld (its reason shown only with
    ``stop_early``) and left out the regions dropped outside the monochromator's range. Now
    a withheld stop reads "not stopping: <why>", and each dropped region is a row marked
    "(not measured)" with its reason."""
    d = beamline.daemon
    assert d.http_url is not None
    edge = {"name": "edge", "start": 8970.0, "stop": 9000.0, "step": 0.5, "dwell": 1.0}
    gone = {**edge, "name": "exafs", "start": 9100.0, "stop": 9400.0, "reason": "outside: dropped"}
    why = "withheld by seq_gap in this spectrum (events of the run went missing)"
    rec = {
        "index": 3, "n_points": 61, "scan_time": 61.0, "stop_early": False,
        "stop_reason": why, "regions": [edge], "rescan": None, "dropped": [gone],
    }  # fmt: skip
    states = [
        {"run": {"recommendation": rec}},
        {"run": {"recommendation": {**rec, "stop_early": True, "stop_reason": "cn 4 twice"}}},
        {"run": {"recommendation": {**rec, "stop_reason": "", "dropped": []}}},
    ]
    page, _, problems = open_page(browser, d.http_url)
    try:
        shown = page.evaluate(
            """(states) => import('./static/run.js').then(({ renderRecommendation }) =>
                 states.map((state) => {
                   renderRecommendation(state);
                   return [document.getElementById('rec-info').textContent,
                           Array.from(document.querySelectorAll('#rec-table tr'))
                             .map((tr) => Array.from(tr.cells).map((td) => td.textContent))];
                 }))""",
            states,
        )
    finally:
        page.close()
    assert not problems, problems
    (info, table), (info_stop, _), (info_plain, table_plain) = shown
    assert info == f"after #3 · 61 points, 61 s · not stopping: {why}"
    assert info_stop.endswith(" · STOP EARLY: cn 4 twice")
    assert info_plain == "after #3 · 61 points, 61 s"
    names = [row[0] for row in table[1:]]
    assert names == ["edge", "exafs (not measured)"]
    assert table[-1][-1] == "outside: dropped"
    assert [row[0] for row in table_plain[1:]] == ["edge"]


def test_the_ready_pill_says_when_no_model_serves(beamline: Harness, browser: Any) -> None:
    """Before: a daemon whose every bundle was refused showed a green "daemon ready" while it
    rejected every spectrum no_model (/readyz said 503). Now the pill is amber, "daemon ready ·
    no model"; serving, it is the green "daemon ready"."""
    d = beamline.daemon
    assert d.http_url is not None
    states = [
        {"health": {"ready": True, "serving": False, "uptime_s": 1.0}},
        {"health": {"ready": True, "serving": True, "uptime_s": 1.0}},
        {"health": {"ready": False, "serving": False, "uptime_s": 1.0}},
    ]
    page, _, problems = open_page(browser, d.http_url)
    try:
        shown = page.evaluate(
            """(states) => import('./static/health.js').then(({ renderHealth }) =>
                 states.map((state) => {
                   try { renderHealth(state); } catch (e) { /* tables need more than this */ }
                   const pill = document.getElementById('ready');
                   return [pill.textContent, pill.className];
                 }))""",
            states,
        )
    finally:
        page.close()
    assert not problems, problems
    assert shown == [
        ["daemon ready · no model", "pill warn"],
        ["daemon ready", "pill ok"],
        ["daemon not ready", "pill bad"],
    ]


def test_the_run_history_draws_out_of_domain_answers_apart(beamline: Harness, browser: Any) -> None:
    """Out-of-domain answers in the run's history are dots in the alarm colour on each of the
    CN, distance and charge plots, and only they are. Before: the distance and charge lines
    drew them as trusted values (the CN plot alone had them apart)."""
    d = beamline.daemon
    assert d.http_url is not None
    history = {
        "index": [0, 1, 2, 3],
        "cn": [4.0, 4.0, 12.0, 12.0],
        "cn_probability": [0.97] * 4,
        "distance": [1.95, 1.95, 2.55, 2.55],
        "charge": [1.1, 1.1, 0.1, 0.1],
        "valence": [2.0, 2.0, 0.0, 0.0],
    }

    def state(ood: list[float]) -> dict[str, Any]:
        run = {"raw_uid": "raw-1", "kind": "fly", "n_ok": 4, "n_rejected": 0}
        return {"run": {**run, "history": {**history, "out_of_domain": ood}}}

    page, _, problems = open_page(browser, d.http_url)
    try:
        # rendered and read in one task, so the page's own state cannot draw in between
        red = page.evaluate(
            """(states) => import('./static/run.js').then(({ renderRun }) =>
                 states.map((state) => {
                   renderRun(state);
                   return ['hist-cn', 'hist-distance', 'hist-charge'].map((id) => {
                     const c = document.getElementById(id);
                     const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                     let n = 0;  // the alarm colour, COLORS.e0 #ef6b6b, opaque
                     for (let i = 0; i < px.length; i += 4) {
                       if (px[i] === 239 && px[i + 1] === 107 && px[i + 2] === 107) n++;
                     }
                     return n;
                   });
                 }))""",
            [state([0.0, 0.0, 1.0, 1.0]), state([0.0, 0.0, 0.0, 0.0])],
        )
    finally:
        page.close()
    assert not problems, problems
    flagged, trusted = red
    assert all(n > 0 for n in flagged), flagged
    assert trusted == [0, 0, 0]
