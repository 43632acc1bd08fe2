"""``xasflow bundle``: seal, sign and verify model bundles, and make signing keys.

A facility seals a bundle (``manifest.sha256``, so the manifest itself is covered by a
hash), signs it with its Ed25519 private key (``manifest.sig``), and configures daemons with
the public key (``models.trusted_keys``, ``models.require_signature``). ``verify`` runs the
daemon's own checks (:func:`xasflow.models.bundle.inspect_bundle`) on a directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from xasflow.errors import CliError, os_problem, path_problem
from xasflow.models.bundle import BundleError, inspect_bundle
from xasflow.models.bundle_write import seal_bundle, sign_bundle
from xasflow.models.integrity import (
    SIGNATURE,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
)

__all__ = ["add_bundle_command", "cmd_bundle"]


def _refused(exc: BundleError) -> int:
    """Report a refusal as ``reason: message`` on stderr; exit status 1."""
    print(f"{exc.reason}: {exc}", file=sys.stderr)
    return 1


def _seal(args: argparse.Namespace) -> int:
    try:
        digest = seal_bundle(args.directory, force=args.force)
    except BundleError as exc:
        return _refused(exc)
    print(f"sealed {args.directory}: manifest sha256 {digest}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    try:
        key = Path(args.key).read_bytes()
        load_private_key(key)  # a bad key is the operator's error, not the bundle's
    except (OSError, ValueError, TypeError) as exc:
        raise CliError(
            f"{args.key}: not a readable, unencrypted Ed25519 private key ({os_problem(exc)})"
        ) from None
    try:
        kid = sign_bundle(args.directory, key)
    except BundleError as exc:
        return _refused(exc)
    print(f"signed {args.directory} with key {kid} (wrote {SIGNATURE})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    if args.require_signature and not args.trusted_key:  # the command's lack, not the bundle's
        raise CliError(
            "--require-signature needs the public key to check the signature with: "
            "give --trusted-key PUB.pem"
        )
    keys: list[bytes] = []
    for name in args.trusted_key:
        try:
            data = Path(name).read_bytes()
            load_public_key(data)
        except (OSError, ValueError) as exc:
            raise CliError(
                f"{name}: not a readable Ed25519 public key ({os_problem(exc)})"
            ) from None
        keys.append(data)
    try:
        verified = inspect_bundle(
            args.directory, trusted_keys=keys, require_signature=args.require_signature
        )
    except BundleError as exc:
        return _refused(exc)
    if verified.signed_by is not None:
        signer = verified.signed_by
    elif (Path(args.directory) / SIGNATURE).is_file():
        signer = f"not checked ({SIGNATURE} present; give --trusted-key)"
    else:
        signer = "none (unsigned)"
    print(f"bundle {verified.manifest.bundle_id}")
    print(f"digest {verified.digest}")
    print(f"signer {signer}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    private_pem, public_pem = generate_keypair()
    private, public = Path(f"{args.prefix}.key"), Path(f"{args.prefix}.pub")
    for path in (private, public):
        if path.exists():
            raise CliError(f"{path} exists; not overwriting a key")
    try:
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private_pem)
        public.write_bytes(public_pem)
    except FileNotFoundError:
        raise CliError(f"cannot write the key pair: no such directory {private.parent}") from None
    except OSError as exc:
        raise CliError(f"cannot write the key pair: {path_problem(exc)}") from None
    kid = key_id(load_public_key(public_pem))
    print(f"key {kid}: private {private} (keep it secret), public {public}")
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    """Run one ``xasflow bundle`` verb."""
    verbs: dict[str, Any] = {"seal": _seal, "sign": _sign, "verify": _verify, "keygen": _keygen}
    return int(verbs[args.bundle_cmd](args))


def add_bundle_command(sub: Any) -> None:
    """Add ``xasflow bundle {seal,sign,verify,keygen}`` to the CLI's subparsers."""
    b = sub.add_parser("bundle", help="seal, sign and verify model bundles")
    bsub = b.add_subparsers(dest="bundle_cmd", required=True)
    s = bsub.add_parser("seal", help="write manifest.sha256 for a bundle whose files match")
    s.add_argument("directory", help="the bundle directory (holds manifest.json)")
    s.add_argument("--force", action="store_true", help="reseal an edited manifest")
    g = bsub.add_parser("sign", help="sign a sealed bundle's manifest (writes manifest.sig)")
    g.add_argument("directory", help="the sealed bundle directory")
    g.add_argument("--key", required=True, help="Ed25519 private key, PEM (xasflow bundle keygen)")
    v = bsub.add_parser("verify", help="check a bundle as the daemon does; exit 1 if refused")
    v.add_argument("directory", help="the bundle directory")
    v.add_argument(
        "--trusted-key",
        action="append",
        default=[],
        metavar="PUB.pem",
        help="an Ed25519 public key (PEM) whose signature is trusted; repeatable",
    )
    v.add_argument(
        "--require-signature",
        action="store_true",
        help="refuse a bundle not signed by a --trusted-key (models.require_signature)",
    )
    k = bsub.add_parser("keygen", help="write PREFIX.key (mode 0600) and PREFIX.pub")
    k.add_argument("prefix", help="path and name of the pair, without .key or .pub")
    b.set_defaults(func=cmd_bundle)
