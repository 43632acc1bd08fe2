"""The analysis pipeline's batches: one prediction and one stack per batch, HERFD declarations."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")
pytest.importorskip("event_model")

from pipeline_helpers import KINDS, T0, Clock, channels, closed, events, opened, scan, validate

from xasflow.daemon.counters import Counters
from xasflow.daemon.pipeline import Pipeline
from xasflow.daemon.registry import ModelRegistry
from xasflow.models.predictor import Predictor
from xasflow.spectra import Spectrum


def test_batch_predicts_once_per_predictor_and_equals_single(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = ["CuCl", "CuO", "Cu2O"] * 7
    outs = [scan("raw-b", i, k, offset=0.5 * (i % 5)) for i, k in enumerate(kinds)]
    single = Pipeline(registry, Counters(), clock=Clock(T0))
    one_by_one = [d for o in [opened("raw-b"), *outs] for d in single.handle(o)]

    calls: list[int] = []
    real = Predictor.predict_prepared

    def counting(self: Predictor, prepared: list) -> list:
        calls.append(len(prepared))
        return real(self, prepared)

    monkeypatch.setattr(Predictor, "predict_prepared", counting)
    batched = Pipeline(registry, Counters(), clock=Clock(T0)).handle_batch([opened("raw-b"), *outs])
    # one call for the whole batch; at most one more of one row: the run's HERFD check, made
    # at its first out-of-domain spectrum (tests/test_herfd_hint.py)
    assert calls[0] == len(kinds) and calls[1:] in ([], [1])
    skip = {"latency_ms"}
    a = [{k: v for k, v in r.items() if k not in skip} for r in events(one_by_one)]
    b = [{k: v for k, v in r.items() if k not in skip} for r in events(batched)]
    # equal answers; numbers equal to float32 rounding (a network's batched matrix products
    # sum in another order than one row at a time)
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key, va in ra.items():
            vb = rb[key]
            if isinstance(va, float):
                assert vb == pytest.approx(va, rel=1e-5, abs=1e-6), key
            elif key == "cn_probabilities":
                assert json.loads(vb) == pytest.approx(json.loads(va), rel=1e-5, abs=1e-6)
            elif key == "motif_ranking":
                pa, pb = json.loads(va), json.loads(vb)
                assert [label for label, _ in pa] == [label for label, _ in pb]
                assert [v for _, v in pb] == pytest.approx([v for _, v in pa], rel=1e-5, abs=1e-6)
            else:
                assert va == vb, key
    assert [r["cn"] for r in b] == [KINDS[k][4] for k in kinds]


def test_herfd_from_the_start_document_or_config_reaches_prepare(
    registry: ModelRegistry, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start document's ``herfd`` (true: the tabulated width, a number: that FWHM) reaches
    ``prepare``, which broadens the spectrum (flagged ``herfd_broadened``); without the key
    the pipeline's setting (``analysis.herfd``) applies; a value that is no width is rejected
    ``bad_broadening`` and counted."""
    from xasflow.daemon.pipeline import REASONS
    from xasflow.spectra import herfd_fwhm

    assert {"edge_step", "herfd_width", "bad_broadening"} <= REASONS
    # the widths reach the spectra whichever path prepares them (one by one or as a stack)
    import xasflow.spectra.process as herfd_module  # where prepare() looks the width up

    seen: list[Any] = []
    real = herfd_module.herfd_width

    def recording(spectrum: Spectrum, *args: Any, **kwargs: Any) -> Any:
        width = real(spectrum, *args, **kwargs)
        seen.append((spectrum.meta.get("herfd"), width))
        return width

    monkeypatch.setattr(herfd_module, "herfd_width", recording)
    # the undeclared-HERFD check broadens on its own (tests/test_herfd_hint.py): left out here
    monkeypatch.setattr(Predictor, "with_herfd_hint", lambda self, spectrum, pred: pred)
    pipeline = Pipeline(registry, counters, clock=Clock(T0 + 0.004))
    docs = pipeline.handle_batch(
        [
            opened("raw-h1", herfd=1.5),
            scan("raw-h1", 0, "Cu2O"),
            closed("raw-h1"),
            opened("raw-h2", herfd=True),
            scan("raw-h2", 0, "Cu2O"),
            opened("raw-h3"),
            scan("raw-h3", 0, "Cu2O"),
            opened("raw-h4", herfd="yes"),
            scan("raw-h4", 0, "Cu2O"),
        ]
    )
    declared = [entry for entry in seen if entry[0] is not None]
    assert declared == [(1.5, 1.5), (True, pytest.approx(herfd_fwhm("Cu", "K")))]
    assert all(width is None for herfd, width in seen if herfd is None)
    h1, h2, h3, h4 = events(docs)
    assert "herfd_broadened" in h1["flags"] and "herfd_broadened" in h2["flags"]
    assert "herfd_broadened" not in h3["flags"]
    assert h1["e0"] != h3["e0"]  # the broadened edge is found elsewhere
    assert (h4["status"], h4["reason"]) == ("rejected", "bad_broadening")
    assert "'yes'" in h4["detail"]
    assert counters.snapshot()["rejected_by_stage"]["analysis"] == {"bad_broadening": 1}
    assert "raw-h1" not in pipeline._declared  # forgotten with its run
    # analysis.herfd: the default for runs that do not say; a start's false switches it off
    seen.clear()
    configured = Pipeline(registry, counters, clock=Clock(T0 + 0.004), herfd=2.0)
    configured.handle_batch(
        [
            opened("raw-c1"),
            scan("raw-c1", 0, "Cu2O"),
            opened("raw-c2", herfd=False),
            scan("raw-c2", 0, "Cu2O"),
            opened("raw-c3", herfd=None),  # a metadata template's null: nothing declared
            scan("raw-c3", 0, "Cu2O"),
            opened("raw-c4", herfd="False"),  # text, as templates often hold it
            scan("raw-c4", 0, "Cu2O"),
        ]
    )
    # the configured width (also where the start says null), none where it says false
    assert [entry for entry in seen if entry[0] is not None] == [(2.0, 2.0), (2.0, 2.0)]
    assert all(width is None for herfd, width in seen if herfd is None)


def test_a_reopened_runs_herfd_survives_batches_in_flight(
    registry: ModelRegistry, counters: Counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches begun before the last one ended (as with a preparation process): a run closed
    in one and reopened under its uid with ``herfd`` in the next keeps that declaration for
    its later batches (it was dropped when the first batch ended after the second began)."""
    monkeypatch.setattr(Predictor, "with_herfd_hint", lambda self, spectrum, pred: pred)
    pipeline = Pipeline(registry, counters, clock=Clock(T0 + 0.004))
    first = pipeline.begin([opened("raw-r"), scan("raw-r", 0, "Cu2O"), closed("raw-r")])
    second = pipeline.begin([opened("raw-r", herfd=1.5), scan("raw-r", 0, "Cu2O")])
    docs = pipeline.end(first) + pipeline.end(second)
    docs += pipeline.handle_batch([scan("raw-r", 1, "Cu2O"), closed("raw-r")])
    validate(docs)
    assert ["herfd_broadened" in row["flags"] for row in events(docs)] == [False, True, True]
    assert [d["exit_status"] for n, d in docs if n == "stop"] == ["success", "success"]
    assert "raw-r" not in pipeline._declared
    reopened = pipeline.begin([opened("raw-s", herfd=True), scan("raw-s", 0, "Cu2O")])
    pipeline.end(reopened)
    pipeline.close_all("shutdown")  # forgets the declarations of the runs it stops
    assert pipeline._declared == {}


def test_a_page_on_one_axis_is_prepared_as_one_stack_and_equals_single(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spectra sharing an energy axis go through ``prepare_batch`` once; every row, bad ones
    included, ends as it does alone (reason, flags, shift, E0, step, answer)."""
    from xasflow.daemon import stack_job

    axis = np.linspace(8940.0, 9120.0, 600)
    kinds = ["CuCl", "CuO", "Cu2O"] * 4
    outs = []
    for i, k in enumerate(kinds):
        o = 0.5 * (i % 5)
        _, ch = channels(k, offset=o, lo=8940.0 + o, hi=9120.0 + o)
        if i == 4:  # a NaN in a channel: rejected before the stack
            ch["it"] = ch["it"].copy()
            ch["it"][7] = np.nan
        elif i == 5:  # no foil: analysed unaligned
            del ch["ir"]
        elif i == 6:  # a broken foil channel: alignment fails, analysed unaligned
            ch["ir"] = -ch["ir"]
        elif i == 7:  # mu never rises: rejected by the preparation, inside the stack
            ch["it"] = 0.5 * ch["i0"]
        outs.append(scan("raw-p", i, k, energy=axis, chans=ch))
    stacks: list[int] = []
    real = stack_job.prepare_batch

    def counting(energy: np.ndarray, mu: np.ndarray, *a: Any, **kw: Any) -> list:
        stacks.append(len(mu))
        return real(energy, mu, *a, **kw)

    monkeypatch.setattr(stack_job, "prepare_batch", counting)
    batched = Pipeline(registry, Counters(), clock=Clock(T0)).handle_batch([opened("raw-p"), *outs])
    assert stacks == [len(kinds) - 1]
    single = Pipeline(registry, Counters(), clock=Clock(T0))
    alone = [d for o in [opened("raw-p"), *outs] for d in single.handle(o)]
    assert stacks == [len(kinds) - 1]  # one by one: never stacked
    rows_b, rows_a = events(batched), events(alone)
    assert [r["reason"] for r in rows_b] == [r["reason"] for r in rows_a]
    assert [r["reason"] for r in rows_b][4:8] == ["not_finite", "", "", "no_edge"]

    def flags(r: dict) -> list[str]:
        return [f for f in r["flags"].split(",") if f and f != "out_of_domain"]

    assert [flags(r) for r in rows_b] == [flags(r) for r in rows_a]
    assert flags(rows_b[5]) == ["no_reference"] and flags(rows_b[6]) == ["align_failed"]
    for b, a in zip(rows_b, rows_a, strict=True):
        for key in ("e0", "edge_step", "energy_shift", "distance"):
            if a[key] is None or (isinstance(a[key], float) and math.isnan(a[key])):
                assert b[key] is None or math.isnan(b[key])
            else:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
        assert (b["status"], b["cn"], b["motif"], b["valence"]) == (
            a["status"],
            a["cn"],
            a["motif"],
            a["valence"],
        )
    shifts = [r["energy_shift"] for i, r in enumerate(rows_b) if i not in (4, 5, 6, 7)]
    assert shifts == pytest.approx(
        [0.5 * (i % 5) for i in range(12) if i not in (4, 5, 6, 7)], abs=0.05
    )


def test_a_glitch_in_the_foil_channel_does_not_move_the_shift_stacked_or_alone(
    registry: ModelRegistry,
) -> None:
    """One Ir reading x0.6 (a glitch of 0.4 foil steps) near 8999 eV in every other row: the
    shift is still the mono's offset and unflagged, in the stack (``stack_job._align``) as
    one by one (``_align_one``); it was -19 eV, applied, and E0 reported 19 eV low."""
    axis = np.linspace(8940.0, 9120.0, 600)
    j = int(np.argmin(np.abs(axis - 8999.0)))
    outs = []
    for i, k in enumerate(["CuCl", "CuO", "Cu2O"] * 4):
        o = 0.5 * (i % 5)
        _, ch = channels(k, offset=o, lo=8940.0 + o, hi=9120.0 + o)
        if i % 2:
            ch["ir"] = ch["ir"].copy()
            ch["ir"][j] *= 0.6
        outs.append(scan("raw-g", i, k, energy=axis, chans=ch))
    batched = Pipeline(registry, Counters(), clock=Clock(T0)).handle_batch([opened("raw-g"), *outs])
    single = Pipeline(registry, Counters(), clock=Clock(T0))
    alone = [d for o in [opened("raw-g"), *outs] for d in single.handle(o)]
    for rows in (events(batched), events(alone)):
        assert [r["energy_shift"] for r in rows] == pytest.approx(
            [0.5 * (i % 5) for i in range(12)], abs=0.05
        )
        assert not any("align" in r["flags"] for r in rows)


def test_a_failing_hint_or_dashboard_copy_never_costs_the_batch_its_documents(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HERFD hint and the dashboard's copy of the latest spectrum run after the graphs
    and before the documents are built: either one raising left the batch's start, events
    and stop unbuilt (the run never opened on the bus)."""

    def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline.herfd_hints, "apply", broken)
    pipeline.on_latest = broken
    docs = pipeline.handle_batch(
        [opened("raw-h"), scan("raw-h", 0, "CuO"), scan("raw-h", 1, "Cu2O"), closed("raw-h", n=2)]
    )
    assert [n for n, _ in docs] == ["start", "descriptor", "event_page", "stop"]
    assert [e["status"] for e in events(docs)] == ["ok", "ok"]
