"""End to end on loopback: bluesky's real 0MQ proxy, a real RunEngine in a subprocess (the
simulated beamline), the daemon, and the embedded tiled catalog, driven by ``xasflow demo``.

The model is the tiny synthetic Cu K bundle of ``test_service`` (trained here, seconds), so
the predictions are not judged, only that every spectrum went the whole way.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")
pytest.importorskip("bluesky")
pytest.importorskip("ophyd")


from xasflow.adapters.tiled_store import read_analysis
from xasflow.sim.demo import DemoError, find_bundle, run_demo

FLY_SPECTRA = 3


def test_demo_streams_a_step_and_a_fly_scan_end_to_end(
    models_dir: Path,
    tmp_path: Path,
) -> None:
    out = io.StringIO()
    summary = run_demo(
        scans=2,
        models_dir=models_dir,
        store_dir=tmp_path / "store",
        http_port=0,
        fly_spectra=FLY_SPECTRA,
        seed=7,
        out=out,
    )
    text = out.getvalue()
    assert not summary["interrupted"] and summary["beamline_exit"] == 0, text
    runs = summary["runs"]
    assert sorted(info["scan"] for info in runs.values()) == ["fly", "step"], text
    assert summary["runs_finished"] == 2, text
    counters = summary["counters"]
    assert counters["spectra_received"] == 1 + FLY_SPECTRA
    assert counters["spectra_analysed"] == 1 + FLY_SPECTRA, counters["rejected"]
    assert counters["decode_errors"] == {} and counters["runs_closed"] == {"success": 2}
    assert summary["spectra_printed"] == 1 + FLY_SPECTRA
    assert text.count(": CN ") == 1 + FLY_SPECTRA  # one printed prediction per spectrum
    # every result is in the tiled catalog, readable by the raw run's uid after shutdown
    for raw_uid, info in runs.items():
        md, rows = read_analysis(tmp_path / "store", raw_uid)
        assert md["start"]["raw_uid"] == raw_uid
        assert md["start"]["scan_kind"] == info["scan"]
        assert md["stop"]["exit_status"] == "success"
        n = 1 if info["scan"] == "step" else FLY_SPECTRA
        assert rows["index"].tolist() == list(range(n))
        assert set(rows["status"]) == {"ok"} and rows["cn"].notna().all()
        # (foil alignment is covered by test_service: the FEFF demo spectra start above the
        # Cu foil's edge, so here it is flagged align_failed and the spectrum used unaligned)
        assert rows["e0"].between(8970.0, 9010.0).all()


def test_demo_without_a_bundle_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="make train-cu"):
        find_bundle(tmp_path)
    bundle = tmp_path / "cu-k"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    with pytest.raises(DemoError, match="--models takes the directory holding bundles"):
        find_bundle(bundle)  # the bundle itself, not its directory
    with pytest.raises(DemoError, match=r"no verified Cu K-edge model bundle"):
        run_demo(scans=1, models_dir=tmp_path, store_dir=tmp_path / "s", http_port=0)


def test_demo_lines_from_two_threads_never_run_together() -> None:
    """The beamline relay and the result printer print from two threads; ``print`` writes a
    line and its newline apart, so a slow terminal showed "... valence +1analysis of ..."."""
    import threading
    import time

    from xasflow.sim.demo_printer import say

    class SlowTerminal(io.StringIO):
        def write(self, text: str) -> int:
            time.sleep(1e-4)  # the other thread gets the GIL in between
            return super().write(text)

    out = SlowTerminal()
    lines = {who: [f"{who} line {k}" for k in range(40)] for who in ("beamline", "analysis")}
    threads = [
        threading.Thread(target=lambda own=own: [say(out, line) for line in own])
        for own in lines.values()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    written = out.getvalue().splitlines()
    assert sorted(written) == sorted(lines["beamline"] + lines["analysis"])
