"""Writing bundles: atomic writes, sealing with ``manifest.sha256``, Ed25519 signing, and
the refusal to replace a folder that is not a bundle.

The reading side (the manifest's schema and the checks before use) is
:mod:`xasflow.models.bundle`; this module only ever writes what that side verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from xasflow.models.bundle import (
    MANIFEST,
    BundleError,
    Manifest,
    check_files,
    inspect_bundle,
    manifest_bytes,
    read_manifest,
    verify_bundle,
)
from xasflow.models.integrity import (
    DIGEST,
    SIGNATURE,
    format_digest,
    load_private_key,
    sign_bytes,
)

__all__ = ["check_replaceable", "seal_bundle", "sign_bundle", "write_bundle"]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def seal_bundle(directory: str | Path, *, force: bool = False) -> str:
    """Write ``manifest.sha256`` for an existing bundle whose files match its manifest.

    For bundles exported before digests existed. A bundle that already has a digest that does
    not match (an edited manifest) is refused unless ``force``. Returns the hex digest.
    """
    directory = Path(directory)
    try:
        inspect_bundle(directory, require_digest=False)
    except BundleError as exc:
        if not (force and exc.reason == "digest_mismatch"):
            raise
        check_files(directory, read_manifest(directory))
    data = manifest_bytes(directory)
    _write_atomic(directory / DIGEST, format_digest(data))
    return hashlib.sha256(data).hexdigest()


def sign_bundle(
    directory: str | Path, private_key_pem: str | bytes | Path, password: bytes | None = None
) -> str:
    """Sign a verified, sealed bundle's manifest with an Ed25519 key; returns the key id.

    Writes ``manifest.sig``; daemons configured with the matching public key then accept it.
    The bytes signed are the bytes verified, never the file read again: a manifest replaced
    in between is left with a signature that does not verify it.
    """
    directory = Path(directory)
    verified = inspect_bundle(directory)
    key = load_private_key(private_key_pem, password)
    text = sign_bytes(verified.manifest_bytes, key)
    _write_atomic(directory / SIGNATURE, text)
    return json.loads(text)["key_id"]


def check_replaceable(directory: str | Path) -> None:
    """Raise :class:`BundleError` (``not_a_bundle``) unless ``directory`` is absent, empty or
    a bundle (holds ``manifest.json``): :func:`write_bundle` replaces it whole, so a results
    folder or a folder of bundles (``--out models``) would be deleted with all it holds."""
    path = Path(directory)
    if not os.path.lexists(path) or (
        path.is_dir() and ((path / MANIFEST).is_file() or not any(path.iterdir()))
    ):
        return
    what = "a folder that is not a bundle" if path.is_dir() else "not a folder"
    raise BundleError(
        f"{path} exists and is {what} (no {MANIFEST}); a bundle replaces its folder whole, so "
        f"name a new or empty folder (e.g. {path / 'cu-k'}) or an existing bundle",
        "not_a_bundle",
    )


def write_bundle(
    directory: str | Path,
    manifest: Manifest,
    files: dict[str, bytes],
    *,
    signing_key: str | bytes | Path | None = None,
) -> Path:
    """Write a bundle atomically: files, manifest and its digest go to a temp dir renamed into place.

    Hashes are computed here, so the manifest's ``files`` is filled in and ``manifest.sha256``
    written (and ``manifest.sig`` with ``signing_key``, an Ed25519 private key PEM). An existing
    bundle at ``directory`` is replaced only after the new one is complete, so a watcher never
    sees a half-written bundle; anything else there is refused (:func:`check_replaceable`).
    """
    directory = Path(directory)
    check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be read by others
    try:
        hashes: dict[str, str] = {}
        for name, data in files.items():
            if Path(name).name != name or name in (MANIFEST, DIGEST, SIGNATURE):
                raise BundleError(f"bundle file name {name!r} is not allowed", "bad_file_name")
            (tmp / name).write_bytes(data)
            hashes[name] = hashlib.sha256(data).hexdigest()
        final = manifest.model_copy(update={"files": hashes})
        text = json.dumps(final.model_dump(mode="json"), indent=2) + "\n"
        (tmp / MANIFEST).write_text(text)
        (tmp / DIGEST).write_text(format_digest(text.encode()))
        if signing_key is not None:
            key = load_private_key(signing_key)
            (tmp / SIGNATURE).write_text(sign_bytes(text.encode(), key))
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
