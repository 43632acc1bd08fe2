"""A bundle's training data rebuilt from its manifest, for steps that refit part of a bundle
(``ood_upgrade``, ``quantize``), and the command line and checks those steps share.

The dataset is read again from the recorded source (its fingerprint must be the bundle's, or
nothing downstream is about the data the bundle learned from), prepared with the bundle's
parameters and split as it was (grouping, salt and fractions recorded in the manifest): the very rows
training used for fitting, validation and test.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xasflow.models.bundle import Manifest, verify_bundle
from xasflow.models.integrity import SIGNATURE
from xasflow.spectra import model_input
from xasflow.training.dataset import Dataset, build_feff_dataset, grid_dataset
from xasflow.training.split import bundle_split


@dataclass
class BundleData:
    """The prepared rows of a bundle's training data: ``dataset`` holds only the rows that
    prepared, ``x`` their model inputs, ``parts`` the row indices of train, val and test."""

    dataset: Dataset
    x: np.ndarray
    parts: dict[str, np.ndarray]

    def inputs(self, part: str) -> np.ndarray:
        """Model inputs of one split part."""
        return self.x[self.parts[part]]


def training_data(manifest: Manifest, data: str | Path | None = None) -> Dataset:
    """The dataset ``manifest``'s bundle was trained on, read again from ``data`` (default its
    ``training.source``); refused unless its fingerprint is the bundle's."""
    t = manifest.training
    source = Path(data if data is not None else t["source"])
    ds = build_feff_dataset(source, manifest.element, progress=False)
    if t.get("fingerprint") and ds.fingerprint != t["fingerprint"]:
        raise ValueError(
            f"{source}: dataset fingerprint {ds.fingerprint[:12]} is not the bundle's "
            f"{str(t['fingerprint'])[:12]}"
        )
    return ds


def rebuild(manifest: Manifest, data: str | Path | None = None) -> BundleData:
    """The training data of ``manifest`` (from ``data``, default its ``training.source``)."""
    ds = training_data(manifest, data)
    g = grid_dataset(ds, manifest.prep)
    sub = ds.subset(g.rows)
    parts = bundle_split(sub, manifest.training)
    return BundleData(sub, model_input(g.y, manifest.features, manifest.prep), parts)


def open_for_rewrite(bundle: str | Path, signing_key: object, verb: str) -> tuple[Path, Manifest]:
    """A bundle a step is about to rewrite: verified, and refused if signed without its key."""
    path = Path(bundle)
    manifest = verify_bundle(path)
    check_signing(path, signing_key, verb)
    return path, manifest


def check_signing(bundle: Path, signing_key: object, verb: str) -> None:
    """Refuse to rewrite a signed bundle without its key (the rewrite would unsign it)."""
    if (bundle / SIGNATURE).exists() and signing_key is None:
        raise ValueError(f"{bundle} is signed: pass the signing key, or {verb} unsigns it")


def bundle_parser(description: str) -> argparse.ArgumentParser:
    """The command line every bundle rewrite shares: the bundle, --out, --data, --signing-key."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("bundle", help="bundle directory")
    ap.add_argument("--out", help="write here instead of replacing the bundle")
    ap.add_argument("--data", help="training data (default: the manifest's training.source)")
    ap.add_argument("--signing-key", help="Ed25519 private key PEM, for a signed bundle")
    return ap


def rewrite_main(
    step: Callable[[str, str | None, str | None, str | None], Path],
    description: str,
    argv: Sequence[str] | None = None,
) -> int:
    """The command line of a step that rewrites one bundle: ``step(bundle, out, data, key)``."""
    args = bundle_parser(description).parse_args(argv)
    print(f"wrote {step(args.bundle, args.out, args.data, args.signing_key)}")
    return 0
