"""The model registry: load, hot-swap, refuse tampered bundles, never serve a partial model."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from test_pipeline import channels, redeploy

from xasflow.daemon.counters import Counters
from xasflow.daemon.registry import ModelRegistry
from xasflow.models.bundle import read_manifest
from xasflow.spectra import Spectrum


@pytest.fixture(scope="module")
def bundle(tiny_cu_bundle: Path) -> Path:
    return tiny_cu_bundle


@pytest.fixture
def model_dir(bundle: Path, tmp_path: Path) -> Path:
    shutil.copytree(bundle, tmp_path / "models" / "cu-k")
    return tmp_path / "models"


def tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def sample() -> Spectrum:
    energy, ch = channels("CuCl")
    return Spectrum(energy, np.log(ch["i0"] / ch["it"]), "Cu", "K")


def wait_for(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_loads_bundles_and_describes_them(model_dir: Path, bundle: Path) -> None:
    (model_dir / ".cu-k.tmp123").mkdir()  # write_bundle's temp dir: ignored
    (model_dir / ".cu-k.tmp123" / "manifest.json").write_text("{")
    (model_dir / "notes").mkdir()  # no manifest: not a bundle
    (model_dir / "README").write_text("models live here")
    counters = Counters()
    reg = ModelRegistry(model_dir, counters)
    manifest = read_manifest(bundle)
    assert [(e.kind, e.element, e.edge, e.bundle_id) for e in reg.events] == [
        ("loaded", "Cu", "K", manifest.bundle_id)
    ]
    pred = reg.get("Cu", "K")
    assert pred is not None and pred.bundle_id == manifest.bundle_id
    assert reg.get("cu", "k") is pred  # symbols and edges are normalised
    assert reg.get("Fe", "K") is None and reg.get("Cu", "L3") is None
    assert pred.predict(sample())["cn"].value == 4
    (info,) = reg.models()
    assert (info["bundle_id"], info["element"], info["edge"]) == (manifest.bundle_id, "Cu", "K")
    assert info["metrics"]["cn"] == manifest.tasks["cn"].metrics
    assert set(info["tasks"]) == {"cn", "environment", "motifs", "valence", "distance", "charge"}
    assert info["loaded_at"] > 0 and info["directory"].endswith("cu-k")
    assert reg.refresh() == []  # nothing changed
    snap = counters.snapshot()
    assert snap["models"] == {"Cu-K": manifest.bundle_id}
    assert (snap["model_swaps"], snap["model_refused"]) == (0, 0)


def test_missing_directory_is_reported_once(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "nope")
    assert [e.kind for e in reg.events] == ["error"]
    assert reg.refresh() == [] and reg.get("Cu", "K") is None
    (tmp_path / "nope").mkdir()
    assert reg.refresh() == []


def test_swap_in_a_new_bundle(model_dir: Path) -> None:
    counters = Counters()
    reg = ModelRegistry(model_dir, counters)
    old = reg.get("Cu", "K")
    assert old is not None
    redeploy(model_dir / "cu-k", model_dir / "cu-k", "cu-k-v2")
    (ev,) = reg.refresh()
    assert (ev.kind, ev.bundle_id, ev.previous) == ("swapped", "cu-k-v2", old.bundle_id)
    new = reg.get("Cu", "K")
    assert new is not None and new is not old and new.bundle_id == "cu-k-v2"
    assert old.predict(sample())["cn"].value == 4  # a predictor already handed out still works
    assert reg.refresh() == []
    assert counters.snapshot()["model_swaps"] == 1
    assert counters.snapshot()["models"] == {"Cu-K": "cu-k-v2"}
    # touching files without changing the bundle is not a swap
    os.utime(model_dir / "cu-k" / "cn.onnx.gz")
    assert reg.refresh() == [] and reg.get("Cu", "K") is new


def test_tampered_bundle_is_refused_and_old_one_kept(
    model_dir: Path, bundle: Path, tmp_path: Path
) -> None:
    counters = Counters()
    reg = ModelRegistry(model_dir, counters)
    serving = reg.get("Cu", "K")
    assert serving is not None

    # a modified bundle deployed atomically (built elsewhere, tampered, renamed into place)
    staged = redeploy(model_dir / "cu-k", tmp_path / "staging" / "cu-k", "cu-k-evil")
    tamper(staged / "cn.onnx.gz")
    shutil.rmtree(model_dir / "cu-k")
    os.replace(staged, model_dir / "cu-k")
    (ev,) = reg.refresh()
    assert ev.kind == "refused" and (ev.element, ev.edge) == ("Cu", "K")
    assert "cn.onnx.gz does not match its manifest hash" in ev.message
    assert f"still serving {serving.bundle_id}" in ev.message
    assert reg.get("Cu", "K") is serving
    assert list(reg.refused()) == ["cu-k"] and "cn.onnx.gz does not match" in reg.refused()["cu-k"]
    assert reg.refresh() == []  # judged once, not re-counted every scan
    assert counters.snapshot()["model_refused"] == 1

    # a good bundle replaces the refused one; then an in-place edit of a served file
    redeploy(bundle, model_dir / "cu-k", "cu-k-good")
    (ev,) = reg.refresh()
    assert (ev.kind, ev.bundle_id, ev.previous) == ("swapped", "cu-k-good", serving.bundle_id)
    assert reg.refused() == {}
    good = reg.get("Cu", "K")
    tamper(model_dir / "cu-k" / "valence.onnx.gz")
    (ev,) = reg.refresh()
    assert ev.kind == "refused" and "valence.onnx.gz does not match" in ev.message
    assert reg.get("Cu", "K") is good
    assert counters.snapshot()["model_refused"] == 2
    assert counters.snapshot()["models"] == {"Cu-K": "cu-k-good"}


def test_partial_bundle_refused_then_loaded_when_complete(model_dir: Path, bundle: Path) -> None:
    counters = Counters()
    reg = ModelRegistry(model_dir, counters)
    # a non-atomic copy in progress: the manifest arrived, the graphs not yet
    partial = model_dir / "cu-k-copy"
    partial.mkdir()
    manifest = read_manifest(bundle).model_copy(
        update={"bundle_id": "cu-k-newer", "created": "2999-01-01T00:00:00+00:00"}
    )
    (partial / "manifest.json").write_text(manifest.model_dump_json())
    (ev,) = reg.refresh()
    assert ev.kind == "refused" and "missing file" in ev.message
    assert reg.get("Cu", "K").bundle_id == read_manifest(bundle).bundle_id  # type: ignore[union-attr]
    for name in manifest.files:
        shutil.copy(bundle / name, partial / name)
    (ev,) = reg.refresh()
    # a newer bundle for the same element/edge in another directory takes over
    assert (ev.kind, ev.bundle_id) == ("swapped", "cu-k-newer")
    assert reg.get("Cu", "K").bundle_id == "cu-k-newer"  # type: ignore[union-attr]
    assert counters.snapshot()["model_refused"] == 1 and reg.refused() == {}

    # removing it: after `remove_after` scans the older bundle serves again
    shutil.rmtree(partial)
    assert reg.refresh() == [] and reg.get("Cu", "K").bundle_id == "cu-k-newer"  # type: ignore[union-attr]
    (ev,) = reg.refresh()
    assert (ev.kind, ev.previous) == ("removed", "cu-k-newer")
    (ev,) = reg.refresh()
    assert (ev.kind, ev.bundle_id) == ("loaded", read_manifest(bundle).bundle_id)
    shutil.rmtree(model_dir / "cu-k")
    reg.refresh()
    assert [e.kind for e in reg.refresh()] == ["removed"] and reg.get("Cu", "K") is None
    assert counters.snapshot()["models"] == {}


def test_concurrent_gets_during_swaps_never_see_partial_models(model_dir: Path) -> None:
    reg = ModelRegistry(model_dir)
    first = reg.get("Cu", "K")
    assert first is not None
    versions = [first.bundle_id] + [f"cu-k-v{k}" for k in range(2, 6)]
    spectrum = sample()
    prepared = first.prepare(spectrum)
    seen: list[str] = []
    problems: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            pred = reg.get("Cu", "K")
            if pred is None:
                problems.append("None")
                continue
            if pred.bundle_id not in versions:
                problems.append(pred.bundle_id)
            if not seen or seen[-1] != pred.bundle_id:
                seen.append(pred.bundle_id)
                # a model handed out is complete: every task's session answers
                result = pred.predict_prepared([prepared])[0]
                if set(result.results) != set(pred.manifest.tasks) or len(result.results) < 5:
                    problems.append(f"partial {pred.bundle_id}")

    thread = threading.Thread(target=reader)
    thread.start()
    reg.start_watching(interval=0.01)
    try:
        assert reg.watching
        for version in versions[1:]:
            redeploy(model_dir / "cu-k", model_dir / "cu-k", version)
            assert wait_for(lambda v=version: reg.get("Cu", "K").bundle_id == v), version  # type: ignore[union-attr]
        assert wait_for(lambda: seen[-1] == versions[-1])  # the reader got there too
    finally:
        done.set()
        thread.join(30)
        reg.stop()
    assert not reg.watching
    assert problems == []
    assert seen[0] == versions[0] and seen[-1] == versions[-1]
    assert seen == sorted(set(seen), key=versions.index)  # versions only ever move forward
    assert [e.kind for e in reg.events] == ["loaded"] + ["swapped"] * 4
