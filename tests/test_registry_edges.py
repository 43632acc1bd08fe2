"""The model registry at its edges: a hostile manifest beside good bundles, an unsealed
bundle with ``require_digest: false``, a serving directory refilled or emptied.

Each test failed on aca8a8c (a read-only review), those from the oversized manifest on
e0ad81b (a second review's suspicions, checked). Where a docstring says what the registry
does wrong, it tells what it did then. They use the shipped models/cu-k
bundle (no training) copied into a temporary models directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from xasflow import paths
from xasflow.daemon.registry import ModelRegistry
from xasflow.models.bundle import read_manifest
from xasflow.models.bundle_write import write_bundle
from xasflow.models.integrity import DIGEST, format_digest

SHIPPED = paths.REPO_ROOT / "models" / "cu-k"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    shutil.copytree(SHIPPED, tmp_path / "models" / "cu-k")
    return tmp_path / "models"


def _copy_as(src: Path, dest: Path, **update: object) -> Path:
    m = read_manifest(src).model_copy(update=update)
    return write_bundle(dest, m, {n: (src / n).read_bytes() for n in m.files})


def _nested_manifest(directory: Path) -> None:
    """A 'sealed' manifest of deeply nested JSON: its digest matches, json.loads recurses."""
    directory.mkdir()
    data = b"[" * 100_000 + b"]" * 100_000
    (directory / "manifest.json").write_bytes(data)
    (directory / DIGEST).write_text(format_digest(data))


def test_hostile_manifest_does_not_lose_a_good_bundle_judged_in_the_same_scan(
    model_dir: Path,
) -> None:
    """registry.py: a RecursionError from json.loads is turned into an
    'invalid' refusal, but _refuse() calls read_manifest() again and catches only BundleError,
    so the RecursionError escapes _refresh() before `self._models = models`. A newer good
    bundle judged earlier in the same scan was already recorded in _seen: it is never served."""
    reg = ModelRegistry(model_dir)
    old = reg.get("Cu", "K")
    assert old is not None
    _copy_as(
        model_dir / "cu-k",
        model_dir / "cu-k2",
        bundle_id="cu-k-v2",
        created="2999-01-01T00:00:00+00:00",
    )
    _nested_manifest(model_dir / "zz")
    errors = []
    for _ in range(3):  # what the watcher thread does: log the exception, poll again
        try:
            reg.refresh()
        except Exception as exc:
            errors.append(type(exc).__name__)
    assert reg.get("Cu", "K").bundle_id == "cu-k-v2"  # type: ignore[union-attr]
    assert errors == []
    assert "zz" in reg.refused()
    assert any(e.kind == "refused" and e.directory.endswith("zz") for e in reg.events)


def test_hostile_manifest_does_not_stop_the_registry_from_starting(model_dir: Path) -> None:
    """Same root cause at start-up: ModelRegistry(...) (run by parts.build_analysis) raises
    RecursionError, so one bad directory in models/ keeps the daemon from starting at all,
    instead of being refused and counted while cu-k serves."""
    _nested_manifest(model_dir / "zz")
    reg = ModelRegistry(model_dir)
    assert reg.get("Cu", "K") is not None
    assert reg.refusal_counts() == {"manifest_unreadable": 1}


def test_require_digest_false_serves_an_unsealed_bundle(model_dir: Path) -> None:
    """registry.py: the default loader builds Predictor(path, ...) without
    require_digest, and Predictor defaults to require_digest=True (predictor.py). So
    models.require_digest: false (config_sections.py) has no effect: every unsealed
    bundle passes the registry's own check and is then refused 'digest_missing' by the loader."""
    (model_dir / "cu-k" / DIGEST).unlink()
    reg = ModelRegistry(model_dir, require_digest=False)
    assert [(e.kind, e.reason) for e in reg.events] == [("loaded", None)]
    assert reg.get("Cu", "K") is not None


def test_a_directory_refilled_with_an_outranked_bundle_stops_serving_the_old_one(
    model_dir: Path,
) -> None:
    """registry.py: cu-k's contents are replaced (write_bundle) by an Fe
    bundle older than the Fe bundle fe-k serves. _judge files it as shadowed standby and
    returns None, so _serve (the only place that drops the directory's old element) never
    runs: Cu stays in service indefinitely from a directory that no longer holds any Cu
    bundle, and /health lists it as served from cu-k. (Had cu-k been deleted, Cu would be
    unloaded after remove_after scans; had the Fe bundle outranked fe-k, Cu would be dropped.)"""
    m = read_manifest(model_dir / "cu-k")
    files = {n: (model_dir / "cu-k" / n).read_bytes() for n in m.files}
    write_bundle(
        model_dir / "fe-k",
        m.model_copy(update={"bundle_id": "fe-new", "element": "Fe", "created": "2999"}),
        files,
    )
    reg = ModelRegistry(model_dir)
    assert reg.serving() == [("Cu", "K"), ("Fe", "K")]
    write_bundle(
        model_dir / "cu-k",
        m.model_copy(update={"bundle_id": "fe-old", "element": "Fe", "created": "2000"}),
        files,
    )
    for _ in range(reg.remove_after + 1):
        reg.refresh()
    assert reg.standby() == {"cu-k": "Fe-K fe-old"}
    assert reg.get("Cu", "K") is None, [
        (x["element"], x["bundle_id"], x["directory"]) for x in reg.models()
    ]


def test_a_serving_bundle_that_loses_its_manifest_is_reported(model_dir: Path) -> None:
    """registry.py: a directory without manifest.json is skipped as 'not (yet) a
    bundle' even when it is the directory currently serving. Deleting cu-k/manifest.json
    (or truncating the bundle to its graphs) is never judged: no refusal, no event, nothing
    in /health, and the in-memory predictor keeps serving as if cu-k were intact."""
    reg = ModelRegistry(model_dir)
    manifest = model_dir / "cu-k" / "manifest.json"
    kept = manifest.read_bytes()
    manifest.unlink()
    events = [e for _ in range(3) for e in reg.refresh()]
    # as a directory that went away: removed after remove_after scans, with an event
    assert [e.kind for e in events] == ["removed"] and reg.get("Cu", "K") is None
    manifest.write_bytes(kept)  # back whole: judged again, and served
    assert [e.kind for e in reg.refresh()] == ["loaded"] and reg.get("Cu", "K") is not None


def test_an_oversized_manifest_is_refused_and_counted_while_the_good_bundle_serves(
    model_dir: Path,
) -> None:
    """A serving directory refilled with a sealed 5 MB manifest (and a graph over the
    operator's limit in another) was read whole by the daemon; now both are refused
    ``too_large`` through the usual path: logged, counted, listed, the old bundle serving."""
    reg = ModelRegistry(model_dir, max_graph_bytes=2 << 20)
    serving = reg.get("Cu", "K")
    assert serving is not None
    _copy_as(model_dir / "cu-k", model_dir / "big-graph", bundle_id="b", created="2999")
    with open(model_dir / "big-graph" / "mlp.onnx", "ab") as fh:
        fh.truncate(3 << 20)
    data = (model_dir / "cu-k" / "manifest.json").read_bytes()
    data += b" " * (5 << 20)
    (model_dir / "cu-k" / "manifest.json").write_bytes(data)
    (model_dir / "cu-k" / DIGEST).write_text(format_digest(data))
    events = reg.refresh()
    assert sorted((e.kind, e.reason) for e in events) == [("refused", "too_large")] * 2
    assert reg.refusal_counts() == {"too_large": 2}
    assert reg.counters.snapshot()["model_refused_by_reason"] == {"too_large": 2}
    assert reg.get("Cu", "K") is serving
    assert "too_large: " in reg.refused()["cu-k"] and "limit" in reg.refused()["big-graph"]


def test_the_graph_limit_is_the_operators_models_max_graph_mb(model_dir: Path) -> None:
    """``models.max_graph_mb`` reaches the daemon's registry (default 256 MiB)."""
    from xasflow.daemon.config import load_config
    from xasflow.daemon.counters import Counters
    from xasflow.daemon.parts import build_analysis

    env = {"XASFLOW__MODELS__DIRECTORY": str(model_dir), "XASFLOW__MODELS__WATCH": "false"}
    assert load_config(None, env).models.max_graph_mb == 256
    registry, _ = build_analysis(
        load_config(None, {**env, "XASFLOW__MODELS__MAX_GRAPH_MB": "1"}), Counters()
    )
    assert registry.refusal_counts() == {"too_large": 1}
    assert "models.max_graph_mb" in registry.refused()["cu-k"]


def test_the_trusted_keys_are_those_read_at_start(model_dir: Path, tmp_path: Path) -> None:
    """registry.py loads each key once to check it, but inspect_bundle reads the key
    files again at every verification. A key file replaced while the daemon runs changed
    whom it trusts, with no restart, event or log (a bundle signed by the new key was
    swapped in); a key file removed or rewritten turned every later bundle into an
    'invalid' refusal (FileNotFoundError). The keys read at start are the ones trusted."""
    pytest.importorskip("cryptography")
    from xasflow.models.bundle_write import sign_bundle
    from xasflow.models.integrity import generate_keypair

    private, public = generate_keypair()
    intruder_private, intruder_public = generate_keypair()
    key_file = tmp_path / "trusted.pem"
    key_file.write_bytes(public)
    sign_bundle(model_dir / "cu-k", private)
    reg = ModelRegistry(model_dir, trusted_keys=[key_file], require_signature=True)
    first = reg.get("Cu", "K")
    assert first is not None
    key_file.write_bytes(intruder_public)  # swapped while serving
    _copy_as(model_dir / "cu-k", model_dir / "evil", bundle_id="evil", created="2999")
    sign_bundle(model_dir / "evil", intruder_private)
    assert [(e.kind, e.reason) for e in reg.refresh()] == [("refused", "signature_invalid")]
    assert reg.get("Cu", "K") is first
    key_file.unlink()  # rotated away: the key read at start still verifies its bundles
    _copy_as(model_dir / "cu-k", model_dir / "cu-k2", bundle_id="v2", created="2999")
    sign_bundle(model_dir / "cu-k2", private)
    assert [(e.kind, e.reason) for e in reg.refresh()] == [("swapped", None)]
    assert reg.get("Cu", "K").bundle_id == "v2"  # type: ignore[union-attr]


def test_an_older_bundle_put_back_in_place_is_served_but_flagged(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """cu-k serves v2; its contents are replaced by the older, valid v1 (a rollback, by an
    operator or by anyone who can write there, signed or not). The registry served v1 with
    an ordinary 'swapped' event at INFO, as if it were an upgrade. It still serves it (the
    same rollback by removing cu-k and adding the old bundle elsewhere cannot be told from
    an operator's), but reports it: a 'rolled_back' event, a WARNING and a count in
    status()."""
    v1 = Path(shutil.copytree(model_dir / "cu-k", tmp_path / "v1"))
    reg = ModelRegistry(model_dir)
    old_id = reg.get("Cu", "K").bundle_id  # type: ignore[union-attr]
    _copy_as(v1, model_dir / "cu-k", bundle_id="cu-k-v2", created="2999-01-01T00:00:00+00:00")
    assert [e.kind for e in reg.refresh()] == ["swapped"]
    # the same created under another id is no rollback, whatever the ids' order
    _copy_as(v1, model_dir / "cu-k", bundle_id="a-v3", created="2999-01-01T00:00:00+00:00")
    assert [e.kind for e in reg.refresh()] == ["swapped"]
    shutil.rmtree(model_dir / "cu-k")
    shutil.copytree(v1, model_dir / "cu-k")
    with caplog.at_level("WARNING", logger="xasflow.daemon.registry"):
        (ev,) = reg.refresh()
    assert (ev.kind, ev.bundle_id, ev.previous) == ("rolled_back", old_id, "a-v3")
    assert "older" in ev.message and "2999" in ev.message
    assert any("rolled_back" in r.getMessage() for r in caplog.records)
    assert reg.get("Cu", "K").bundle_id == old_id  # type: ignore[union-attr]
    assert reg.status()["rollbacks"] == 1
    assert reg.counters.snapshot()["model_swaps"] == 3
