"""Model bundles: a directory of ONNX graphs plus a ``manifest.json`` that verifies them.

A bundle is what training exports and what the daemon loads. Loading checks the manifest's
own digest (``manifest.sha256``, optionally an Ed25519 ``manifest.sig``; see
:mod:`xasflow.models.integrity`), the schema version and the sha256 of every file the
manifest lists, so a tampered, unsealed or half-copied bundle is refused with a message that
names the file and a reason code. No file is read past its size limit (``too_large``, see
:mod:`xasflow.models.integrity`). Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from xasflow.errors import os_problem
from xasflow.models.integrity import (
    DIGEST,
    MAX_GRAPH_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SIDECAR_BYTES,
    SIGNATURE,
    BundleError,
    check_layout,
    load_public_key,
    parse_digest,
    read_limited,
    too_large,
    verify_signature,
)
from xasflow.spectra import FeatureSpec, PrepParams

SCHEMA_VERSION = 2
#: Schema versions this xasflow reads: 1 (one tree graph per task, no uncertainty) and 2.
READABLE_SCHEMAS = (1, 2)
MANIFEST = "manifest.json"
#: How a too-large graph's refusal names its limit (the daemon's setting).
GRAPH_LIMIT = "models.max_graph_mb"

Estimator = Literal["extra_trees", "random_forest", "mlp", "cnn", "ensemble"]


class MemberSpec(BaseModel):
    """One graph output a task averages: a tree ensemble's, or a deep ensemble's member mean."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["extra_trees", "random_forest", "mlp", "cnn"]
    file: str
    output: str = Field(description="graph output with this task's probabilities or values")
    std_output: str | None = Field(None, description="spread over a deep ensemble, same shape")
    seeds: list[int] = Field(default_factory=list)
    precision: Literal["float32", "int8"] = Field(
        "float32", description="int8: weights quantised (xasflow.training.quantize)"
    )


class ConformalSpec(BaseModel):
    """Split-conformal calibration of a task: sets (classifiers) or intervals (regressors)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(gt=0, lt=1, description="1 - target coverage")
    method: Literal["lac", "aps", "absolute", "scaled"]
    qhat: float = Field(description="score quantile fitted on the calibration split")
    offset: float = Field(0.0, description="scaled intervals: half-width qhat * (spread + offset)")
    n_calibration: int = 0


class SpreadSpec(BaseModel):
    """Deep-ensemble disagreement as a second out-of-domain signal: per graph output, the
    members' spread summed over its columns (e.g. ``cn_std``), averaged over the outputs."""

    model_config = ConfigDict(extra="forbid")

    outputs: list[tuple[str, str]] = Field(min_length=1, description="(graph file, output)")
    scale: float = Field(gt=0, description="the spread that counts as 1 in the combined score")


class OodSpec(BaseModel):
    """The out-of-domain scorer: a graph from ``x`` to one score per spectrum, and its threshold.

    With ``spread`` set the score is ``max(graph score / recon_scale, spread / spread.scale)``:
    a spectrum is out of domain when its shape is unlike the training spectra or when the
    network members disagree about it (``xasflow.models.uncertainty.combined_ood``).
    """

    model_config = ConfigDict(extra="forbid")

    file: str
    output: str = "ood_score"
    method: str
    threshold: float = Field(description="scores above this are flagged out_of_domain")
    details: dict[str, Any] = Field(default_factory=dict)
    recon_scale: float | None = Field(None, gt=0, description="divides the graph score")
    spread: SpreadSpec | None = None

    @model_validator(mode="after")
    def _check_combined(self) -> OodSpec:
        if (self.spread is None) != (self.recon_scale is None):
            raise ValueError("ood.spread and ood.recon_scale go together")
        return self

    def files(self) -> set[str]:
        """Every graph file the score reads."""
        out = {self.file}
        if self.spread is not None:
            out |= {f for f, _ in self.spread.outputs}
        return out


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
    selection_margin: float | None = Field(
        None, description="how far below the best score the served candidate could be"
    )

    @model_validator(mode="after")
    def _check_graphs(self) -> TaskSpec:
        if not self.members and self.file is None:
            raise ValueError("a task needs members (or, schema 1, a file)")
        if self.kind == "classifier" and len(self.classes or ()) < 2:  # onnxruntime aborts
            raise ValueError("a classifier needs two classes or more")  # on a one-class graph
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

    def set_coverage(self, name: str) -> float | None:
        """The coverage task ``name``'s sets or intervals hold as served (None: uncalibrated):
        the conformal target, except for the CN-motif label, whose set the decoder cuts to
        labels of the CN set (:func:`~xasflow.models.batch.make_consistent`): its test-split
        coverage where the manifest records it (0.906 on the shipped Cu bundle, 0.886 before
        it was served on both rises; the target is 0.9)."""
        task = self.tasks.get(name)
        if task is None or task.conformal is None:
            return None
        measured = task.metrics.get("set_coverage")
        if name == "environment" and "cn" in self.tasks and isinstance(measured, float):
            return measured
        return 1.0 - task.conformal.alpha

    def graph_files(self) -> set[str]:
        """Every ONNX graph the tasks and the out-of-domain scorer read."""
        return set(self.served_outputs())

    def served_outputs(self) -> dict[str, set[str]]:
        """Per graph file, the outputs the decoder reads (what a served session computes)."""
        out: dict[str, set[str]] = {}
        for task in self.tasks.values():
            for m in task.graph_members():
                out.setdefault(m.file, set()).add(m.output)
                if m.std_output:
                    out[m.file].add(m.std_output)
        if self.ood is not None:
            out.setdefault(self.ood.file, set()).add(self.ood.output)
            for f, o in self.ood.spread.outputs if self.ood.spread is not None else ():
                out.setdefault(f, set()).add(o)
        return out


def sha256_file(path: Path, limit: int | None = None) -> str:
    """Hex sha256 of a file, read in chunks; with ``limit``, a file over ``limit`` bytes is
    refused ``too_large`` from its size before it is read (and if it grows while read)."""
    digest = hashlib.sha256()
    read = 0
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if limit is not None and size > limit:
            raise too_large(path, f"{size} bytes", limit, GRAPH_LIMIT)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            read += len(chunk)
            if limit is not None and read > limit:
                raise too_large(path, "grew while read", limit, GRAPH_LIMIT)
            digest.update(chunk)
    return digest.hexdigest()


def _parse_manifest(path: Path, raw_bytes: bytes) -> Manifest:
    """Schema-check manifest bytes read from ``path``."""
    try:
        raw = json.loads(raw_bytes)
    except (ValueError, RecursionError, MemoryError) as exc:  # a hostile file: nested 1e5 deep
        raise BundleError(
            f"{path}: unreadable manifest: {type(exc).__name__}: {str(exc)[:200]}",
            "manifest_unreadable",
        ) from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version not in READABLE_SCHEMAS:
        raise BundleError(
            f"{path}: schema_version {version!r}, this xasflow reads {list(READABLE_SCHEMAS)}",
            "schema_version",
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{path}: invalid manifest: {exc}", "manifest_invalid") from exc


def manifest_bytes(directory: Path) -> bytes:
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"{directory}: no {MANIFEST}; not a model bundle (or a partial copy)", "not_a_bundle"
        )
    try:
        return read_limited(path, MAX_MANIFEST_BYTES, "MAX_MANIFEST_BYTES")
    except OSError as exc:
        raise BundleError(f"{path}: unreadable manifest: {exc}", "manifest_unreadable") from exc


def read_manifest(directory: str | Path) -> Manifest:
    """Parse and schema-check ``manifest.json`` (no hash check; see :func:`verify_bundle`)."""
    directory = Path(directory)
    return _parse_manifest(directory / MANIFEST, manifest_bytes(directory))


# ---------------------------------------------------------------------------- integrity


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every check: its manifest, the manifest's sha256 and its signer,
    and the manifest's exact bytes as checked (what :func:`sign_bundle` signs)."""

    manifest: Manifest
    digest: str  # sha256 of manifest.json's exact bytes
    signed_by: str | None = None  # key id of the trusted key that verified manifest.sig
    manifest_bytes: bytes = field(default=b"", repr=False, compare=False)


def inspect_bundle(
    directory: str | Path,
    *,
    root: str | Path | None = None,
    require_digest: bool = True,
    trusted_keys: Sequence[str | bytes | Path] = (),
    require_signature: bool = False,
    max_graph_bytes: int = MAX_GRAPH_BYTES,
) -> VerifiedBundle:
    """Verify a bundle completely (see :func:`verify_bundle`) and say what was verified."""
    directory = Path(directory)
    check_layout(directory, None if root is None else Path(root))
    data = manifest_bytes(directory)
    digest = hashlib.sha256(data).hexdigest()
    digest_path = directory / DIGEST
    if digest_path.is_file():
        try:
            expected = parse_digest(read_limited(digest_path, MAX_SIDECAR_BYTES).decode())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise BundleError(
                f"{digest_path}: unreadable digest: {exc}", "digest_mismatch"
            ) from exc
        if expected != digest:
            raise BundleError(
                f"{directory}: {MANIFEST} does not match {DIGEST} (expected "
                f"{expected[:12]}…, found {digest[:12]}…); the manifest was edited after the "
                f"bundle was sealed; refusing it",
                "digest_mismatch",
            )
    elif require_digest:
        raise BundleError(
            f"{directory}: no {DIGEST}, so {MANIFEST} itself is not covered by a hash; "
            f"re-export the bundle, or seal a bundle you trust with "
            f"`xasflow bundle seal {directory}` (xasflow.models.bundle_write.seal_bundle)",
            "digest_missing",
        )
    signed_by = None
    sig_path = directory / SIGNATURE
    keys = [load_public_key(k) for k in trusted_keys]
    if require_signature and not keys:
        raise BundleError(
            f"{directory}: signed bundles are required but no trusted public key is configured",
            "signature_missing",
        )
    if keys and sig_path.is_file():
        try:
            sig_text = read_limited(sig_path, MAX_SIDECAR_BYTES).decode()
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(f"{sig_path}: unreadable: {exc}", "signature_invalid") from exc
        signed_by = verify_signature(data, sig_text, keys, str(directory))
    elif require_signature:
        raise BundleError(
            f"{directory}: no {SIGNATURE}; this daemon serves only signed bundles "
            f"(sign with `xasflow bundle sign {directory} --key PRIVATE.pem`)",
            "signature_missing",
        )
    manifest = _parse_manifest(directory / MANIFEST, data)
    check_files(directory, manifest, max_graph_bytes)
    return VerifiedBundle(manifest, digest, signed_by, data)


def check_files(
    directory: Path, manifest: Manifest, max_graph_bytes: int = MAX_GRAPH_BYTES
) -> None:
    """Every file the manifest lists is present, within ``max_graph_bytes`` and matches its
    sha256."""
    needed = manifest.graph_files()
    unlisted = needed - set(manifest.files)
    if unlisted:
        raise BundleError(
            f"{directory}: task files not covered by hashes: {sorted(unlisted)}", "file_unlisted"
        )
    for name, expected in manifest.files.items():
        if Path(name).name != name or name in (MANIFEST, DIGEST, SIGNATURE, "", ".", ".."):
            raise BundleError(
                f"{directory}: manifest names a file outside the bundle: {name!r}", "bad_file_name"
            )
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{directory}: missing file {name} (partial bundle?)", "file_missing")
        try:
            actual = sha256_file(path, max_graph_bytes)
        except OSError as exc:
            raise BundleError(
                f"{directory}: unreadable file {name}: {os_problem(exc)}", "invalid"
            ) from exc
        if actual != expected:
            raise BundleError(
                f"{directory}: {name} does not match its manifest hash "
                f"(expected {expected[:12]}…, found {actual[:12]}…); refusing a modified bundle",
                "file_mismatch",
            )


def verify_bundle(
    directory: str | Path,
    *,
    root: str | Path | None = None,
    require_digest: bool = True,
    trusted_keys: Sequence[str | bytes | Path] = (),
    require_signature: bool = False,
    max_graph_bytes: int = MAX_GRAPH_BYTES,
) -> Manifest:
    """Check a bundle before use; raise BundleError (with a ``reason``) on any defect.

    Checks: no symlinks or hard links (and, with ``root``, a bundle directory that really
    lies in ``root``); ``manifest.sha256`` matches the manifest's bytes (required unless
    ``require_digest`` is False); ``manifest.sig`` verifies with one of ``trusted_keys`` (PEM
    text or paths) when keys are given, and must exist with ``require_signature``; the schema;
    every listed file's sha256. Nothing is read past its size limit: the manifest's and its
    sidecars' are fixed, each listed file's is ``max_graph_bytes`` (``too_large``).
    """
    return inspect_bundle(
        directory,
        root=root,
        require_digest=require_digest,
        trusted_keys=trusted_keys,
        require_signature=require_signature,
        max_graph_bytes=max_graph_bytes,
    ).manifest
