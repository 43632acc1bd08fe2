"""Bundle integrity: the manifest's detached digest, optional Ed25519 signatures, safe paths.

A bundle's ``manifest.json`` lists the sha256 of every other file; this module covers the
manifest itself. ``manifest.sha256`` holds the sha256 of the manifest's exact bytes in
``sha256sum`` format (``sha256sum -c manifest.sha256`` checks it by hand). A digest catches a
manifest edited by hand or damaged in a copy, but anyone who can edit the manifest can also
recompute it; a facility that needs protection against deliberate edits signs bundles:
``manifest.sig`` holds an Ed25519 signature over the same bytes, checked against public keys
the daemon is configured with. Signatures need the ``cryptography`` package (imported only
when a key or signature is used).

Bundles are read only through real files: a symlink anywhere, a hard-linked file, or a bundle
directory that resolves outside the models directory is refused, so what is verified is what
lives in the models directory. Every refusal is a :class:`BundleError` with a short
``reason`` code (see :data:`REASONS`) for counting.

Nothing is read beyond a size limit, so a huge file dropped into a watched models directory
cannot exhaust the daemon's memory: :func:`read_limited` checks the open file's size before
reading it and reads at most one byte past the limit (a file still growing is refused too);
:func:`gunzip_limited` bounds a compressed graph's decompressed size the same way. The
limits: :data:`MAX_MANIFEST_BYTES` for ``manifest.json``, :data:`MAX_SIDECAR_BYTES` for its
digest and signature, :data:`MAX_GRAPH_BYTES` (the default; the daemon's
``models.max_graph_mb``) for every file the manifest lists. Over a limit: ``too_large``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

from xasflow.errors import os_problem

__all__ = [
    "DIGEST",
    "MAX_GRAPH_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_SIDECAR_BYTES",
    "REASONS",
    "SIGNATURE",
    "BundleError",
    "check_layout",
    "format_digest",
    "generate_keypair",
    "gunzip_limited",
    "key_id",
    "load_private_key",
    "load_public_key",
    "parse_digest",
    "public_key_pem",
    "read_limited",
    "sign_bytes",
    "too_large",
    "verify_signature",
]

#: Detached digest of ``manifest.json`` (``sha256sum`` format).
DIGEST = "manifest.sha256"
#: Detached Ed25519 signature of ``manifest.json`` (JSON: algorithm, key_id, signature).
SIGNATURE = "manifest.sig"

#: Largest ``manifest.json`` read (bytes). The shipped Cu K manifest is ~40 KB (tasks,
#: classes, metrics, hashes); 4 MiB leaves a hundredfold margin while json.loads and the
#: schema check of it stay within tens of MB.
MAX_MANIFEST_BYTES = 4 << 20
#: Largest ``manifest.sha256`` or ``manifest.sig`` read (bytes; ~80 and ~200 as written).
MAX_SIDECAR_BYTES = 64 << 10
#: Default largest file a manifest lists (its graphs), on disk and, for a ``.gz`` graph,
#: decompressed (bytes). The shipped graphs total 1.5 MB; protobuf parses at most 2 GiB, and
#: serving a graph takes a few times its size in memory while its session is built.
MAX_GRAPH_BYTES = 256 << 20

#: Refusal reason codes, with what each means.
REASONS: dict[str, str] = {
    "not_a_bundle": "no manifest.json",
    "manifest_unreadable": "manifest.json is not readable JSON",
    "schema_version": "manifest written for another schema version",
    "manifest_invalid": "manifest.json does not match the schema",
    "digest_missing": "no manifest.sha256 (an unsealed bundle)",
    "digest_mismatch": "manifest.json does not match manifest.sha256 (edited manifest)",
    "signature_missing": "a signature is required and manifest.sig is absent",
    "signature_invalid": "manifest.sig is not a valid signature by a trusted key",
    "file_missing": "a file the manifest lists is absent (partial bundle)",
    "file_mismatch": "a file does not match its manifest hash (modified file)",
    "file_unlisted": "a task's file is not covered by the manifest's hashes",
    "bad_file_name": "the manifest names a file outside the bundle",
    "symlink": "a symbolic link in or as the bundle",
    "hardlink": "a hard-linked file (it can be changed through another path)",
    "outside_models_dir": "the bundle resolves outside the models directory",
    "too_large": "the manifest, its digest or signature, or a graph is over its size limit",
    "bundle_id_reused": "a different manifest under a bundle_id already seen",
    "load_error": "the graphs could not be loaded (onnxruntime)",
    "invalid": "any other defect",
}


class BundleError(RuntimeError):
    """A bundle that cannot be used; the message says which file and why, ``reason`` a code."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason if reason in REASONS else "invalid"


# ---------------------------------------------------------------------------- digest


def format_digest(manifest_bytes: bytes, name: str = "manifest.json") -> str:
    """The ``manifest.sha256`` text for these manifest bytes (``sha256sum`` format)."""
    return f"{hashlib.sha256(manifest_bytes).hexdigest()}  {name}\n"


def parse_digest(text: str, name: str = "manifest.json") -> str:
    """The hex digest for ``name`` in a ``manifest.sha256`` text; ValueError when malformed."""
    for line in text.splitlines():
        parts = line.strip().split()
        if len(parts) == 2 and parts[1].lstrip("*") == name:
            hexdigest = parts[0].lower()
            if len(hexdigest) == 64 and all(c in "0123456789abcdef" for c in hexdigest):
                return hexdigest
    raise ValueError(f"no sha256 line for {name}")


# ---------------------------------------------------------------------------- sizes


def too_large(path: Path | str, what: str, limit: int, setting: str) -> BundleError:
    """The ``too_large`` refusal of ``path`` (``what``: its size, or how it exceeds it)."""
    return BundleError(
        f"{path}: {what}, over the {limit}-byte limit ({setting}); refused", "too_large"
    )


def read_limited(path: Path, limit: int, setting: str = "a fixed limit") -> bytes:
    """A file's bytes, or BundleError("too_large") when it holds more than ``limit``.

    The open file's size is checked before anything is read, and at most ``limit + 1``
    bytes are read, so neither a huge file nor one growing meanwhile is held in memory.
    ``setting`` names the limit in the message (a configuration key, or a fixed limit).
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise too_large(path, f"{size} bytes", limit, setting)
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise too_large(path, "grew while read", limit, setting)
    return data


def gunzip_limited(data: bytes, limit: int, where: str, setting: str = "a fixed limit") -> bytes:
    """``data`` decompressed, or BundleError("too_large") when that exceeds ``limit`` bytes
    (a small file that inflates to gigabytes is stopped after ``limit + 1`` bytes)."""
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
        out = fh.read(limit + 1)
    if len(out) > limit:
        raise too_large(where, "decompressed", limit, setting)
    return out


# ---------------------------------------------------------------------------- paths


def check_layout(directory: Path, root: Path | None = None) -> None:
    """Refuse symlinks, hard links, non-files and a bundle outside ``root`` (the models dir).

    ``root`` None checks only the bundle's own entries (a bundle verified on its own).
    """
    if root is not None:
        if directory.is_symlink():
            raise BundleError(
                f"{directory}: the bundle directory is a symbolic link "
                f"(to {os.readlink(directory)}); copy the bundle into {root} instead",
                "symlink",
            )
        real, real_root = directory.resolve(), Path(root).resolve()
        if real.parent != real_root:
            raise BundleError(
                f"{directory}: resolves to {real}, outside the models directory {real_root}",
                "outside_models_dir",
            )
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError as exc:
        raise BundleError(f"{directory}: no such bundle directory", "not_a_bundle") from exc
    except NotADirectoryError as exc:
        raise BundleError(
            f"{directory}: not a directory (a bundle is a directory holding manifest.json)",
            "invalid",
        ) from exc
    except OSError as exc:
        raise BundleError(
            f"{directory}: unreadable bundle directory: {os_problem(exc)}", "invalid"
        ) from exc
    real_dir = directory.resolve()
    for entry in entries:
        st = entry.stat(follow_symlinks=False)
        path = directory / entry.name
        if stat.S_ISLNK(st.st_mode):
            raise BundleError(
                f"{directory}: {entry.name} is a symbolic link (to {os.readlink(path)}); "
                f"bundles must hold their own files",
                "symlink",
            )
        if stat.S_ISDIR(st.st_mode):
            continue  # not part of the bundle; never read
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{directory}: {entry.name} is not a regular file", "invalid")
        if st.st_nlink > 1:
            raise BundleError(
                f"{directory}: {entry.name} is hard-linked ({st.st_nlink} links), so it can "
                f"change through another path; copy it instead",
                "hardlink",
            )
        if path.resolve().parent != real_dir:
            raise BundleError(
                f"{directory}: {entry.name} resolves outside the bundle", "outside_models_dir"
            )


# ---------------------------------------------------------------------------- signatures


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - cryptography ships with the daemon extra
        raise BundleError(
            "bundle signatures need the 'cryptography' package (pip install cryptography)",
            "signature_invalid",
        ) from exc
    return serialization, ed25519


def _pem_bytes(key: str | bytes | Path) -> bytes:
    if isinstance(key, Path):
        return key.read_bytes()
    data = key.encode() if isinstance(key, str) else key
    if b"-----BEGIN" not in data:
        return Path(data.decode()).read_bytes()  # a path given as a string
    return data


def public_key_pem(key: str | bytes | Path) -> bytes:
    """An Ed25519 public key's PEM bytes, read from its file (if a path) and checked now.

    What a long-lived verifier keeps: the keys it trusts are then those it was given, not
    whatever a key file holds at each later verification. ValueError when not such a key.
    """
    data = _pem_bytes(key)
    load_public_key(data)
    return data


def load_public_key(key: str | bytes | Path) -> Any:
    """An Ed25519 public key from PEM text/bytes or a PEM file's path; ValueError otherwise."""
    serialization, ed25519 = _crypto()
    loaded = serialization.load_pem_public_key(_pem_bytes(key))
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise ValueError(f"not an Ed25519 public key: {type(loaded).__name__}")
    return loaded


def load_private_key(key: str | bytes | Path, password: bytes | None = None) -> Any:
    """An Ed25519 private key from PEM text/bytes or a PEM file's path; ValueError otherwise."""
    serialization, ed25519 = _crypto()
    loaded = serialization.load_pem_private_key(_pem_bytes(key), password=password)
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise ValueError(f"not an Ed25519 private key: {type(loaded).__name__}")
    return loaded


def key_id(public_key: Any) -> str:
    """A short stable name for a public key: the first 16 hex digits of its raw bytes' sha256."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PEM, public PEM), unencrypted."""
    serialization, ed25519 = _crypto()
    private = ed25519.Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def sign_bytes(data: bytes, private_key: Any) -> str:
    """The ``manifest.sig`` text: an Ed25519 signature of ``data`` with the signer's key id."""
    signature = private_key.sign(data)
    doc = {
        "algorithm": "ed25519",
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(signature).decode(),
    }
    return json.dumps(doc, indent=2) + "\n"


def verify_signature(data: bytes, sig_text: str, trusted_keys: list[Any], where: str) -> str:
    """Check a ``manifest.sig`` text over ``data`` against trusted public keys; the signer's id.

    Raises BundleError("signature_invalid") when malformed or when no trusted key verifies it.
    """
    from cryptography.exceptions import InvalidSignature

    try:
        doc = json.loads(sig_text)
        if doc.get("algorithm") != "ed25519":
            raise ValueError(f"algorithm {doc.get('algorithm')!r}, expected 'ed25519'")
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{where}: malformed {SIGNATURE}: {exc}", "signature_invalid") from exc
    for key in trusted_keys:
        try:
            key.verify(signature, data)
        except InvalidSignature:
            continue
        return key_id(key)
    ids = ", ".join(key_id(k) for k in trusted_keys) or "none configured"
    raise BundleError(
        f"{where}: {SIGNATURE} (key {doc.get('key_id')!r}) does not verify manifest.json "
        f"with any trusted key ({ids}); edited manifest or untrusted signer",
        "signature_invalid",
    )
