"""The model registry: load, hot-swap, refuse tampered bundles, never serve a partial model."""

from __future__ import annotations

import gc
import json
import os
import shutil
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from pipeline_helpers import channels, events, opened, redeploy, scan

import xasflow.daemon.registry_events as registry_events
from xasflow.daemon.counters import Counters
from xasflow.daemon.pipeline import Pipeline
from xasflow.daemon.registry import ModelRegistry
from xasflow.models.bundle import read_manifest
from xasflow.models.bundle_write import seal_bundle, sign_bundle, write_bundle
from xasflow.models.integrity import format_digest, generate_keypair
from xasflow.models.predictor import Predictor
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


def test_a_bundle_accepts_its_element_whatever_the_manifests_spelling(bundle: Path) -> None:
    """The registry files a manifest's "cu"/"k" under Cu K; the predictor agrees, instead of
    refusing every Cu spectrum as no_model while /health says the model serves."""
    predictor = Predictor(bundle)
    predictor.manifest = predictor.manifest.model_copy(update={"element": "cu", "edge": "k"})
    spectrum = sample()
    assert predictor.accepts(spectrum)
    assert not predictor.accepts(spectrum.with_(element="Ni"))


def test_the_operators_edge_limit_replaces_the_bundles(model_dir: Path) -> None:
    """analysis.min_edge_snr reaches every bundle the registry loads: a spectrum the bundle's
    limit (5) refuses as weak_edge is prepared under 0 (never refuse); 1e4 refuses a good one."""
    from xasflow.daemon.config import DaemonConfig
    from xasflow.spectra import SpectrumError, prepare

    clean = sample()
    default = ModelRegistry(model_dir).get("Cu", "K")
    assert default is not None and default.prep.min_edge_snr == 5.0
    found = default.prepare(clean)  # E0 from the clean spectrum: noise would move it
    noise = found.edge_step / 3.0 * np.random.default_rng(0).standard_normal(clean.mu.size)
    noisy = clean.with_(mu=clean.mu + noise)  # the step is about 3x the point noise
    with pytest.raises(SpectrumError) as err:
        prepare(noisy, default.prep, e0=found.e0)
    assert err.value.reason == "weak_edge"
    lenient = ModelRegistry(model_dir, min_edge_snr=0.0).get("Cu", "K")
    assert lenient is not None and prepare(noisy, lenient.prep, e0=found.e0).edge_step > 0
    mild = clean.with_(mu=clean.mu + noise / 30)  # the step about 90x the noise
    assert prepare(mild, default.prep, e0=found.e0).edge_step > 0
    strict = ModelRegistry(model_dir, min_edge_snr=1e4).get("Cu", "K")
    assert strict is not None
    with pytest.raises(SpectrumError, match="point noise"):
        prepare(mild, strict.prep, e0=found.e0)
    assert DaemonConfig(analysis={"min_edge_snr": 2}).analysis.min_edge_snr == 2.0  # type: ignore[arg-type]


def test_on_serving_follows_the_last_bundle_leaving_and_one_coming_back(
    model_dir: Path, bundle: Path
) -> None:
    """What MODEL_OK follows: told at once, then only when serving any bundle turns."""
    said: list[bool] = []
    reg = ModelRegistry(model_dir, remove_after=1)
    reg.on_serving(said.append)
    assert said == [True]
    shutil.rmtree(model_dir / "cu-k")
    assert [e.kind for e in reg.refresh()] == ["removed"] and said == [True, False]
    assert reg.refresh() == [] and said == [True, False]
    shutil.copytree(bundle, model_dir / "cu-k")
    assert [e.kind for e in reg.refresh()] == ["loaded"] and said == [True, False, True]


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
    text = manifest.model_dump_json()
    (partial / "manifest.json").write_text(text)
    (partial / "manifest.sha256").write_text(format_digest(text.encode()))
    (ev,) = reg.refresh()
    assert ev.kind == "refused" and "missing file" in ev.message and ev.reason == "file_missing"
    assert reg.get("Cu", "K").bundle_id == read_manifest(bundle).bundle_id  # type: ignore[union-attr]
    for name in manifest.files:
        shutil.copy(bundle / name, partial / name)
    (ev,) = reg.refresh()
    # a newer bundle for the same element/edge in another directory takes over
    assert (ev.kind, ev.bundle_id) == ("swapped", "cu-k-newer")
    assert reg.get("Cu", "K").bundle_id == "cu-k-newer"  # type: ignore[union-attr]
    assert counters.snapshot()["model_refused"] == 1 and reg.refused() == {}
    assert reg.standby() == {"cu-k": f"Cu-K {read_manifest(bundle).bundle_id}"}

    # removing it: after `remove_after` scans the older bundle serves again, in that same scan
    shutil.rmtree(partial)
    assert reg.refresh() == [] and reg.get("Cu", "K").bundle_id == "cu-k-newer"  # type: ignore[union-attr]
    removed, loaded = reg.refresh()
    assert (removed.kind, removed.previous) == ("removed", "cu-k-newer")
    assert (loaded.kind, loaded.bundle_id) == ("loaded", read_manifest(bundle).bundle_id)
    assert "takes over" in removed.message
    assert reg.get("Cu", "K").bundle_id == read_manifest(bundle).bundle_id  # type: ignore[union-attr]
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


# --------------------------------------------------------------------------- integrity (issue 13)


def edit_manifest(directory: Path, change, reseal: bool) -> None:  # type: ignore[no-untyped-def]
    """Edit a bundle's manifest in place; ``reseal`` recomputes its digest too (as an attacker
    with write access could), leaving only the registry's memory of the bundle_id to notice."""
    path = directory / "manifest.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    if reseal:
        seal_bundle(directory, force=True)


def reverse_cn(doc: dict) -> None:  # type: ignore[type-arg]
    doc["tasks"]["cn"]["classes"] = doc["tasks"]["cn"]["classes"][::-1]


def to_iron(doc: dict) -> None:  # type: ignore[type-arg]
    doc["element"] = "Fe"


@pytest.mark.parametrize("reseal", [False, True], ids=["digest-stale", "digest-recomputed"])
@pytest.mark.parametrize("change", [reverse_cn, to_iron], ids=["classes", "element"])
def test_edited_manifest_is_refused_and_old_model_keeps_serving(
    model_dir: Path, change, reseal: bool
) -> None:  # type: ignore[no-untyped-def]
    counters = Counters()
    reg = ModelRegistry(model_dir, counters)
    serving = reg.get("Cu", "K")
    assert serving is not None and serving.predict(sample())["cn"].value == 4
    edit_manifest(model_dir / "cu-k", change, reseal)
    (ev,) = reg.refresh()
    reason = "bundle_id_reused" if reseal else "digest_mismatch"
    assert (ev.kind, ev.reason) == ("refused", reason)
    assert reg.refused()["cu-k"].startswith(f"{reason}: ")
    assert reg.get("Cu", "K") is serving and reg.get("Fe", "K") is None
    assert reg.get("Cu", "K").predict(sample())["cn"].value == 4  # type: ignore[union-attr]
    assert reg.refusal_counts() == {reason: 1}
    snap = counters.snapshot()
    assert snap["model_refused"] == 1 and snap["model_refused_by_reason"] == {reason: 1}
    assert not any(g.startswith("model_refusals") for g in snap["gauges"])  # the counter says it
    assert reg.status()["refused"]["cu-k"]["reason"] == reason


def test_symlinked_bundles_are_refused(model_dir: Path, tmp_path: Path) -> None:
    counters = Counters()
    reg = ModelRegistry(model_dir, counters)
    serving = reg.get("Cu", "K")
    outside = redeploy(model_dir / "cu-k", tmp_path / "elsewhere" / "cu-k", "cu-k-outside")
    manifest = json.loads((outside / "manifest.json").read_text())
    manifest["created"] = "2999-01-01T00:00:00+00:00"  # would outrank the serving bundle
    redeploy_doc = read_manifest(outside).model_validate(manifest)
    write_bundle(outside, redeploy_doc, {n: (outside / n).read_bytes() for n in manifest["files"]})
    # 1. the bundle directory is a symlink to a valid bundle outside the models directory
    (model_dir / "cu-link").symlink_to(outside, target_is_directory=True)
    # 2. a real directory whose graph is a symlink to an identical file outside
    inner = redeploy(outside, model_dir / "cu-files", "cu-k-files")
    (inner / "cn.onnx.gz").unlink()
    (inner / "cn.onnx.gz").symlink_to(outside / "cn.onnx.gz")
    # 3. a hard-linked graph
    hard = redeploy(outside, model_dir / "cu-hard", "cu-k-hard")
    (hard / "charge.onnx.gz").unlink()
    os.link(outside / "charge.onnx.gz", hard / "charge.onnx.gz")
    events = reg.refresh()
    assert sorted((e.directory.rsplit("/", 1)[-1], e.kind, e.reason) for e in events) == [
        ("cu-files", "refused", "symlink"),
        ("cu-hard", "refused", "hardlink"),
        ("cu-link", "refused", "symlink"),
    ]
    assert reg.get("Cu", "K") is serving
    assert reg.refusal_counts() == {"hardlink": 1, "symlink": 2}
    assert counters.snapshot()["model_refused"] == 3
    assert reg.refresh() == []  # judged once


def test_removing_the_newer_bundle_leaves_no_gap(model_dir: Path, bundle: Path) -> None:
    older = read_manifest(bundle).bundle_id
    newer = read_manifest(bundle).model_copy(
        update={"bundle_id": "cu-k-newer", "created": "2999-01-01T00:00:00+00:00"}
    )
    write_bundle(model_dir / "cu-k-new", newer, {n: (bundle / n).read_bytes() for n in newer.files})
    gaps: list[str] = []

    def loader(path: Path) -> Predictor:  # runs while a scan loads a bundle
        if reg_ref and reg_ref[0].get("Cu", "K") is None:
            gaps.append(f"no model while loading {path.name}")
        return Predictor(path)

    reg_ref: list[ModelRegistry] = []
    reg = ModelRegistry(model_dir, loader=loader)
    reg_ref.append(reg)
    assert reg.get("Cu", "K").bundle_id == "cu-k-newer"  # type: ignore[union-attr]
    pipe = Pipeline(reg)
    docs = pipe.handle_batch([opened("raw-gap")])
    shutil.rmtree(model_dir / "cu-k-new")
    for k in range(reg.remove_after + 1):  # a spectrum between every two scans
        docs += pipe.handle_batch([scan("raw-gap", k)])
        reg.refresh()
    docs += pipe.handle_batch([scan("raw-gap", 99)])
    assert gaps == []
    results = events(docs)
    assert [r["status"] for r in results] == ["ok"] * (reg.remove_after + 2), results
    assert [r["bundle_id"] for r in results][-1] == older
    assert reg.get("Cu", "K").bundle_id == older  # type: ignore[union-attr]
    assert [e.kind for e in reg.events][-2:] == ["removed", "loaded"]


def test_a_refused_standby_is_skipped_at_takeover(model_dir: Path, bundle: Path) -> None:
    base = read_manifest(bundle)
    for name, created in (("cu-a", "2998"), ("cu-b", "2999")):
        m = base.model_copy(update={"bundle_id": name, "created": f"{created}-01-01T00:00:00"})
        write_bundle(model_dir / name, m, {n: (bundle / n).read_bytes() for n in m.files})
    reg = ModelRegistry(model_dir, remove_after=1)
    assert reg.get("Cu", "K").bundle_id == "cu-b"  # type: ignore[union-attr]
    assert set(reg.standby()) == {"cu-a", "cu-k"}
    tamper(model_dir / "cu-a" / "cn.onnx.gz")  # noticed when cu-a is judged again
    shutil.rmtree(model_dir / "cu-b")
    events = reg.refresh()
    assert [(e.kind, e.reason) for e in events] == [
        ("refused", "file_mismatch"),
        ("removed", None),
        ("loaded", None),
    ]
    assert reg.get("Cu", "K").bundle_id == base.bundle_id  # type: ignore[union-attr]


def test_replaced_predictors_are_freed_and_memory_returned(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gc.collect()  # predictors of earlier tests are released before counting
    refs: list[weakref.ref] = []
    live_at_trim: list[int] = []  # predictors still alive each time the heap is trimmed
    monkeypatch.setattr(
        registry_events, "_TRIM", lambda: live_at_trim.append(sum(r() is not None for r in refs))
    )
    reg = ModelRegistry(model_dir)
    refs.append(weakref.ref(reg.get("Cu", "K")))
    for k in range(5):
        redeploy(model_dir / "cu-k", model_dir / "cu-k", f"cu-k-swap{k}")
        assert [e.kind for e in reg.refresh()] == ["swapped"]
        refs.append(weakref.ref(reg.get("Cu", "K")))
    gc.collect()
    assert [r() is None for r in refs] == [True] * 5 + [False]  # nothing keeps old sessions
    # trimmed once per swap, when the replaced predictor was already gone
    assert live_at_trim == [0] * 5
    held = reg.get("Cu", "K")  # a caller still using the predictor when it is replaced
    redeploy(model_dir / "cu-k", model_dir / "cu-k", "cu-k-swap-held")
    reg.refresh()
    assert live_at_trim == [0] * 5  # not freed yet: nothing to trim
    del held  # freed here, but trimming waits until its sessions are gone too
    assert live_at_trim == [0] * 5
    assert reg.refresh() == [] and live_at_trim == [0] * 6  # trimmed at the next scan


def test_a_facility_can_require_signed_bundles(model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    private, public = generate_keypair()
    other, _ = generate_keypair()
    (tmp_path / "trusted.pem").write_bytes(public)
    with pytest.raises(ValueError):
        ModelRegistry(model_dir, trusted_keys=[b"-----BEGIN PUBLIC KEY-----\nnope\n"])
    reg = ModelRegistry(model_dir, trusted_keys=[tmp_path / "trusted.pem"], require_signature=True)
    assert reg.get("Cu", "K") is None
    assert [(e.kind, e.reason) for e in reg.events] == [("refused", "signature_missing")]
    sign_bundle(model_dir / "cu-k", other)  # signed, but not by a trusted key
    assert [(e.kind, e.reason) for e in reg.refresh()] == [("refused", "signature_invalid")]
    sign_bundle(model_dir / "cu-k", private)
    assert [e.kind for e in reg.refresh()] == ["loaded"]
    assert reg.refusal_counts() == {"signature_invalid": 1, "signature_missing": 1}
    assert reg.status()["require_signature"] is True and reg.status()["refused"] == {}
