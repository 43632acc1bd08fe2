"""Bundle checks at their edges: files too large to read, and what ``sign_bundle`` signs.

Each test failed on e0ad81b (a review's suspicions, checked). They use the shipped
models/cu-k bundle (no training) copied into a temporary models directory.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import xasflow.models.bundle_write as bundle_module
from xasflow import paths
from xasflow.models.bundle import BundleError, inspect_bundle, read_manifest
from xasflow.models.bundle_write import sign_bundle
from xasflow.models.integrity import (
    DIGEST,
    SIGNATURE,
    format_digest,
    generate_keypair,
    load_public_key,
    verify_signature,
)
from xasflow.models.predictor import Predictor

SHIPPED = paths.REPO_ROOT / "models" / "cu-k"
MIB = 1 << 20


@pytest.fixture
def cu(tmp_path: Path) -> Path:
    return Path(shutil.copytree(SHIPPED, tmp_path / "models" / "cu-k"))


def _reason(directory: Path, **kw: Any) -> str:
    with pytest.raises(BundleError) as info:
        inspect_bundle(directory, **kw)
    return info.value.reason


def _rewrite(directory: Path, data: bytes) -> None:
    """Replace the manifest and reseal it (what anyone with write access can do)."""
    (directory / "manifest.json").write_bytes(data)
    (directory / DIGEST).write_text(format_digest(data))


def test_a_manifest_over_the_limit_is_refused_as_too_large(cu: Path) -> None:
    """A valid, sealed manifest padded past 4 MiB (the shipped one is ~40 KB) was read
    whole and served: nothing bounds what ``manifest_bytes`` reads. Now it is refused
    ``too_large`` from its size, and a manifest just under the limit is still read."""
    data = (cu / "manifest.json").read_bytes()
    assert len(data) < 64 * 1024
    _rewrite(cu, data + b" " * (4 * MIB - len(data)))  # exactly at the limit: read
    assert inspect_bundle(cu).manifest.bundle_id == read_manifest(SHIPPED).bundle_id
    _rewrite(cu, data + b" " * (4 * MIB + 1 - len(data)))
    assert _reason(cu) == "too_large"
    with pytest.raises(BundleError, match="4194304-byte limit"):
        read_manifest(cu)


def test_a_sidecar_over_the_limit_is_refused(cu: Path) -> None:
    """manifest.sha256 and manifest.sig were read whole (``read_text``) too."""
    digest = (cu / DIGEST).read_text()
    (cu / DIGEST).write_text(digest + "\n" * MIB)
    assert _reason(cu) == "too_large"


def test_a_huge_graph_file_is_refused_from_its_size_without_reading_it(cu: Path) -> None:
    """A listed graph of 300 MB (sparse: no disk, all zeros) was hashed through to the end
    before being refused ``file_mismatch``, and a matching one would then have been read
    whole by the Predictor. Now it is refused ``too_large`` from its size alone."""
    with open(cu / "mlp.onnx", "r+b") as fh:
        fh.truncate(300 * MIB)
    assert _reason(cu) == "too_large"


def test_the_graph_limit_is_the_callers_and_bounds_a_decompressed_graph(cu: Path) -> None:
    """``max_graph_bytes`` lowers (or raises) the 256 MiB default: the shipped mlp.onnx is
    1.46 MB; a ``.gz`` graph is bounded after decompression too (a 30 KB file inflating to
    8 MB), so a small compressed file cannot blow up in the Predictor."""
    assert _reason(cu, max_graph_bytes=MIB) == "too_large"
    assert inspect_bundle(cu, max_graph_bytes=2 * MIB).manifest.ood is not None
    m = read_manifest(cu)
    assert m.ood is not None
    bomb = gzip.compress((cu / "ood.onnx").read_bytes() + bytes(8 * MIB), compresslevel=1)
    assert len(bomb) < 2 * MIB
    files = {n: (cu / n).read_bytes() for n in m.files if n != "ood.onnx"}
    m = m.model_copy(update={"ood": m.ood.model_copy(update={"file": "ood.onnx.gz"})})
    bundle_module.write_bundle(cu, m, {**files, "ood.onnx.gz": bomb})
    inspect_bundle(cu, max_graph_bytes=2 * MIB)  # the file as stored is within the limit
    with pytest.raises(BundleError, match="decompressed") as info:
        Predictor(cu, max_graph_bytes=2 * MIB)
    assert info.value.reason == "too_large"


def test_sign_bundle_signs_the_manifest_it_verified(
    cu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sign_bundle verified the bundle, then read manifest.json again and signed that: a
    manifest swapped in between (edited, resealed) was signed without ever being checked,
    and a daemon requiring signatures then served it. Now the verified bytes are signed, so
    the swapped manifest fails its signature."""
    pytest.importorskip("cryptography")
    private, public = generate_keypair()
    verified_bytes = (cu / "manifest.json").read_bytes()
    checked = bundle_module.inspect_bundle

    def then_swapped(directory: Path, **kw: Any) -> Any:
        result = checked(directory, **kw)
        doc = json.loads(verified_bytes)
        doc["tasks"]["cn"]["classes"] = doc["tasks"]["cn"]["classes"][::-1]
        _rewrite(Path(directory), (json.dumps(doc, indent=2) + "\n").encode())
        return result

    monkeypatch.setattr(bundle_module, "inspect_bundle", then_swapped)
    sign_bundle(cu, private)
    monkeypatch.undo()
    sig = (cu / SIGNATURE).read_text()
    verify_signature(verified_bytes, sig, [load_public_key(public)], str(cu))
    assert _reason(cu, trusted_keys=[public], require_signature=True) == "signature_invalid"


def test_write_bundle_replaces_only_a_bundle_or_an_empty_folder(cu: Path, tmp_path: Path) -> None:
    """A bundle is written over its folder whole: a folder that is neither empty nor a bundle
    (a results folder, a folder of bundles) is refused with ``not_a_bundle``, its files kept;
    an empty folder or an existing bundle is replaced."""
    m = read_manifest(cu)
    files = {n: (cu / n).read_bytes() for n in m.files}
    busy = tmp_path / "results"
    (busy / "other-bundle").mkdir(parents=True)
    (busy / "other-bundle" / "manifest.json").write_text("{}")
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle") as info:
        bundle_module.write_bundle(busy, m, files)
    assert info.value.reason == "not_a_bundle"
    assert (busy / "notes.txt").read_text() == "keep me"
    assert (busy / "other-bundle" / "manifest.json").exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(BundleError, match="not a folder"):
        bundle_module.write_bundle(tmp_path / "a-file", m, files)
    (tmp_path / "empty").mkdir()
    inspect_bundle(bundle_module.write_bundle(tmp_path / "empty", m, files))
    inspect_bundle(bundle_module.write_bundle(cu, m, files))  # a bundle over a bundle


def test_a_one_class_classifier_is_refused_before_any_graph_runs(cu: Path) -> None:
    """onnxruntime aborts the process (SIGABRT) on a one-class classifier graph; training
    leaves such a task out, and a manifest that lists one (an older or hand-made bundle) is
    refused at load instead of taking the daemon down."""
    manifest = json.loads((cu / "manifest.json").read_text())
    manifest["tasks"]["valence"]["classes"] = [2]
    _rewrite(cu, json.dumps(manifest).encode())
    with pytest.raises(BundleError, match="two classes or more"):
        inspect_bundle(cu)
