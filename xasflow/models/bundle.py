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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from xasflow.spectra import FeatureSpec, PrepParams

SCHEMA_VERSION = 2
#: Schema versions this xasflow reads: 1 (one tree graph per task, no uncertainty) and 2.
READABLE_SCHEMAS = (1, 2)
MANIFEST = "manifest.json"

Estimator = Literal["extra_trees", "random_forest", "mlp", "cnn", "ensemble"]


class BundleError(RuntimeError):
    """A bundle that cannot be used; the message says which file and why."""


class MemberSpec(BaseModel):
    """One graph output a task averages: a tree ensemble's, or a deep ensemble's member mean."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["extra_trees", "random_forest", "mlp", "cnn"]
    file: str
    output: str = Field(description="graph output with this task's probabilities or values")
    std_output: str | None = Field(None, description="spread over a deep ensemble, same shape")
    seeds: list[int] = Field(default_factory=list)


class ConformalSpec(BaseModel):
    """Split-conformal calibration of a task: sets (classifiers) or intervals (regressors)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(gt=0, lt=1, description="1 - target coverage")
    method: Literal["lac", "aps", "absolute", "scaled"]
    qhat: float = Field(description="score quantile fitted on the calibration split")
    n_calibration: int = 0


class OodSpec(BaseModel):
    """The out-of-domain scorer: a graph from ``x`` to one score per spectrum, and its threshold."""

    model_config = ConfigDict(extra="forbid")

    file: str
    output: str = "ood_score"
    method: str
    threshold: float = Field(description="scores above this are flagged out_of_domain")
    details: dict[str, Any] = Field(default_factory=dict)


class TaskSpec(BaseModel):
    """One prediction task: the graphs that compute it and how its doubt is calibrated."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["classifier", "regressor", "multi_regressor"]
    file: str | None = Field(None, description="schema 1: the task's single tree graph")
    estimator: Estimator = "extra_trees"
    members: list[MemberSpec] = Field(default_factory=list)
    target: str = Field(description="what is predicted, in words")
    classes: list[Any] | None = None  # classifier labels, in probability column order
    outputs: list[str] | None = None  # multi_regressor output names
    unit: str | None = None
    threshold: float | None = None  # ranking threshold for multi_regressor outputs
    metrics: dict[str, float] = Field(default_factory=dict)
    region_importance: dict[str, float] = Field(default_factory=dict)
    temperature: float | None = Field(None, gt=0, description="calibration: softmax(log p / T)")
    conformal: ConformalSpec | None = None
    selection: dict[str, float] = Field(
        default_factory=dict, description="validation score of every candidate estimator"
    )

    @model_validator(mode="after")
    def _check_graphs(self) -> TaskSpec:
        if not self.members and self.file is None:
            raise ValueError("a task needs members (or, schema 1, a file)")
        return self

    def graph_members(self) -> list[MemberSpec]:
        """The graph outputs this task averages (schema 1: its one tree graph)."""
        if self.members:
            return self.members
        assert self.file is not None
        output = "probabilities" if self.kind == "classifier" else "variable"
        return [MemberSpec(kind="extra_trees", file=self.file, output=output)]


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
    ood: OodSpec | None = None
    files: dict[str, str] = Field(default_factory=dict, description="file -> sha256")

    def graph_files(self) -> set[str]:
        """Every ONNX graph the tasks and the out-of-domain scorer read."""
        needed = {m.file for task in self.tasks.values() for m in task.graph_members()}
        if self.ood is not None:
            needed.add(self.ood.file)
        return needed


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
    if version not in READABLE_SCHEMAS:
        raise BundleError(
            f"{path}: schema_version {version!r}, this xasflow reads {list(READABLE_SCHEMAS)}"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{path}: invalid manifest: {exc}") from exc


def verify_bundle(directory: str | Path) -> Manifest:
    """Read the manifest and check every listed file's sha256; raise BundleError on any mismatch."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    needed = manifest.graph_files()
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
