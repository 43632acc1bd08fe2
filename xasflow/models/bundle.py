"""Model bundles: a directory of ONNX graphs plus a ``manifest.json`` that verifies them.

A bundle is what training exports and what the daemon loads. Loading checks the schema
version and the sha256 of every file the manifest lists, so a tampered or half-copied
bundle is refused with a message that names the file. Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xasflow.spectra import FeatureSpec, PrepParams

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """A bundle that cannot be used; the message says which file and why."""


class TaskSpec(BaseModel):
    """One prediction task and the ONNX graph that computes it."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["classifier", "regressor", "multi_regressor"]
    file: str
    target: str = Field(description="what is predicted, in words")
    classes: list[Any] | None = None  # classifier labels, in probability column order
    outputs: list[str] | None = None  # multi_regressor output names
    unit: str | None = None
    threshold: float | None = None  # ranking threshold for multi_regressor outputs
    metrics: dict[str, float] = Field(default_factory=dict)
    region_importance: dict[str, float] = Field(default_factory=dict)


class Manifest(BaseModel):
    """Everything needed to use, trust and trace a bundle."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    bundle_id: str
    element: str
    edge: str = "K"
    created: str
    code_version: str
    prep: PrepParams
    features: FeatureSpec
    input_name: str = "x"
    input_width: int
    tasks: dict[str, TaskSpec]
    regions: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="named energy regions relative to E0, eV"
    )
    training: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="file -> sha256")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: str | Path) -> Manifest:
    """Parse and schema-check ``manifest.json`` (no hash check; see :func:`verify_bundle`)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{directory}: no {MANIFEST}; not a model bundle (or a partial copy)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest: {exc}") from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{path}: schema_version {version!r}, this xasflow reads {SCHEMA_VERSION}"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{path}: invalid manifest: {exc}") from exc


def verify_bundle(directory: str | Path) -> Manifest:
    """Read the manifest and check every listed file's sha256; raise BundleError on any mismatch."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    needed = {task.file for task in manifest.tasks.values()}
    unlisted = needed - set(manifest.files)
    if unlisted:
        raise BundleError(f"{directory}: task files not covered by hashes: {sorted(unlisted)}")
    for name, expected in manifest.files.items():
        if Path(name).name != name:
            raise BundleError(f"{directory}: manifest names a file outside the bundle: {name!r}")
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{directory}: missing file {name} (partial bundle?)")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"{directory}: {name} does not match its manifest hash "
                f"(expected {expected[:12]}…, found {actual[:12]}…); refusing a modified bundle"
            )
    return manifest


def write_bundle(directory: str | Path, manifest: Manifest, files: dict[str, bytes]) -> Path:
    """Write a bundle atomically: files and manifest go to a temp dir that is renamed into place.

    Hashes are computed here, so the manifest's ``files`` is filled in. An existing bundle at
    ``directory`` is replaced only after the new one is complete, so a watcher never sees a
    half-written bundle.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be read by others
    try:
        hashes: dict[str, str] = {}
        for name, data in files.items():
            (tmp / name).write_bytes(data)
            hashes[name] = hashlib.sha256(data).hexdigest()
        final = manifest.model_copy(update={"files": hashes})
        (tmp / MANIFEST).write_text(json.dumps(final.model_dump(mode="json"), indent=2) + "\n")
        verify_bundle(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
