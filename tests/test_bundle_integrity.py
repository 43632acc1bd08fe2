"""Bundle integrity: the manifest's own digest, Ed25519 signatures, symlinks and hard links."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from xasflow.models.bundle import BundleError, inspect_bundle, read_manifest, verify_bundle
from xasflow.models.bundle_write import seal_bundle, sign_bundle, write_bundle
from xasflow.models.integrity import DIGEST, SIGNATURE, generate_keypair, key_id, load_public_key


@pytest.fixture
def copy(tiny_cu_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_cu_bundle, tmp_path / "models" / "cu-k"))


def refused(reason: str, directory: Path, **kw: object) -> str:
    with pytest.raises(BundleError) as info:
        verify_bundle(directory, **kw)  # type: ignore[arg-type]
    assert info.value.reason == reason, str(info.value)
    return str(info.value)


def edit(directory: Path, change) -> None:  # type: ignore[no-untyped-def]
    path = directory / "manifest.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def test_written_bundles_are_sealed_in_sha256sum_format(copy: Path) -> None:
    data = (copy / "manifest.json").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert (copy / DIGEST).read_text() == f"{digest}  manifest.json\n"
    assert inspect_bundle(copy).digest == digest
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--quiet", "-c", DIGEST], cwd=copy, check=True)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["tasks"]["cn"].update(classes=d["tasks"]["cn"]["classes"][::-1]),
        lambda d: d["tasks"]["motifs"].update(threshold=0.99),
        lambda d: d.update(element="Fe"),
    ],
    ids=["classes-reversed", "threshold", "element"],
)
def test_an_edited_manifest_is_refused(copy: Path, change) -> None:  # type: ignore[no-untyped-def]
    verify_bundle(copy)
    edit(copy, change)
    message = refused("digest_mismatch", copy)
    assert "manifest.json does not match manifest.sha256" in message


def test_unsealed_bundle_is_refused_with_the_fix_and_can_be_sealed(copy: Path) -> None:
    (copy / DIGEST).unlink()
    message = refused("digest_missing", copy)
    assert "xasflow bundle seal" in message and "seal_bundle" in message
    assert verify_bundle(copy, require_digest=False).bundle_id == read_manifest(copy).bundle_id
    digest = seal_bundle(copy)
    assert inspect_bundle(copy).digest == digest
    assert seal_bundle(copy) == digest  # sealing twice changes nothing
    # sealing never blesses an edited manifest or modified files without being told to
    edit(copy, lambda d: d.update(element="Fe"))
    with pytest.raises(BundleError, match=r"does not match manifest\.sha256"):
        seal_bundle(copy)
    seal_bundle(copy, force=True)
    assert verify_bundle(copy).element == "Fe"
    data = bytearray((copy / "cn.onnx.gz").read_bytes())
    data[100] ^= 0xFF
    (copy / "cn.onnx.gz").write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        seal_bundle(copy, force=True)
    assert info.value.reason == "file_mismatch"


def test_symlinks_hard_links_and_outside_directories_are_refused(
    copy: Path, tmp_path: Path
) -> None:
    outside = Path(shutil.copytree(copy, tmp_path / "elsewhere" / "cu-k"))
    # an identical file, but reached through a link
    (copy / "cn.onnx.gz").unlink()
    (copy / "cn.onnx.gz").symlink_to(outside / "cn.onnx.gz")
    assert "cn.onnx.gz is a symbolic link" in refused("symlink", copy)
    (copy / "cn.onnx.gz").unlink()
    os.link(outside / "cn.onnx.gz", copy / "cn.onnx.gz")
    refused("hardlink", copy)
    (copy / "cn.onnx.gz").unlink()
    shutil.copy(outside / "cn.onnx.gz", copy / "cn.onnx.gz")
    verify_bundle(copy, root=copy.parent)
    # the bundle directory itself a link, and a bundle checked against another models dir
    link = copy.parent / "cu-link"
    link.symlink_to(outside, target_is_directory=True)
    assert "directory is a symbolic link" in refused("symlink", link, root=copy.parent)
    refused("outside_models_dir", outside, root=copy.parent)
    # a stray link in the bundle (not listed in the manifest) is refused too
    (copy / "README").symlink_to("/etc/hostname")
    refused("symlink", copy)


def test_signed_bundles(copy: Path, tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    private, public = generate_keypair()
    other_private, other_public = generate_keypair()
    (tmp_path / "trusted.pem").write_bytes(public)
    keys = [tmp_path / "trusted.pem"]
    # a facility that requires signatures refuses unsigned bundles
    assert "xasflow bundle sign" in refused(
        "signature_missing", copy, trusted_keys=keys, require_signature=True
    )
    refused("signature_missing", copy, require_signature=True)  # and no key configured
    signer = sign_bundle(copy, private)
    assert signer == key_id(load_public_key(public))
    assert json.loads((copy / SIGNATURE).read_text())["key_id"] == signer
    found = inspect_bundle(copy, trusted_keys=keys, require_signature=True)
    assert found.signed_by == signer
    assert inspect_bundle(copy, trusted_keys=[str(keys[0])]).signed_by == signer  # path as str
    refused("signature_invalid", copy, trusted_keys=[other_public])  # an untrusted signer
    # an edited manifest whose digest was recomputed still fails the signature
    edit(copy, lambda d: d.update(element="Fe"))
    seal_bundle(copy, force=True)
    verify_bundle(copy)  # the digest alone cannot tell
    assert "does not verify manifest.json" in refused("signature_invalid", copy, trusted_keys=keys)
    (copy / SIGNATURE).write_text("{not json")
    assert "malformed" in refused("signature_invalid", copy, trusted_keys=keys)
    # write_bundle signs when given a key
    m = read_manifest(copy).model_copy(update={"element": "Cu", "bundle_id": "cu-k-signed"})
    files = {n: (copy / n).read_bytes() for n in m.files}
    out = write_bundle(tmp_path / "signed", m, files, signing_key=other_private)
    assert inspect_bundle(out, trusted_keys=[other_public]).signed_by == key_id(
        load_public_key(other_public)
    )


def test_reserved_names_cannot_be_bundle_files(copy: Path, tmp_path: Path) -> None:
    m = read_manifest(copy)
    with pytest.raises(BundleError) as info:
        write_bundle(tmp_path / "x", m, {DIGEST: b"0" * 64})
    assert info.value.reason == "bad_file_name"
    assert not (tmp_path / "x").exists()


def test_bundle_cli_keygen_seal_sign_verify(
    copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``xasflow bundle``: keygen writes a 0600 private key; seal prints the digest; sign the
    key id; verify prints id, digest and signer, and exits 1 with ``reason: message``."""
    pytest.importorskip("cryptography")
    from xasflow.cli import main

    prefix = tmp_path / "keys" / "facility"
    prefix.parent.mkdir()
    assert main(["bundle", "keygen", str(prefix)]) == 0
    key, pub = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    assert key.stat().st_mode & 0o777 == 0o600
    kid = key_id(load_public_key(pub.read_bytes()))
    assert kid in capsys.readouterr().out
    assert main(["bundle", "keygen", str(prefix)]) == 2  # never overwrites a key
    assert "exists" in capsys.readouterr().err

    bundle_id = read_manifest(copy).bundle_id
    (copy / DIGEST).unlink()
    assert main(["bundle", "verify", str(copy)]) == 1
    assert capsys.readouterr().err.startswith("digest_missing: ")
    assert main(["bundle", "seal", str(copy)]) == 0
    digest = hashlib.sha256((copy / "manifest.json").read_bytes()).hexdigest()
    assert digest in capsys.readouterr().out

    args = ["bundle", "verify", str(copy), "--trusted-key", str(pub), "--require-signature"]
    assert main(args) == 1
    assert capsys.readouterr().err.startswith("signature_missing: ")
    assert main(["bundle", "sign", str(copy), "--key", str(key)]) == 0
    assert kid in capsys.readouterr().out
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"bundle {bundle_id}", f"digest {digest}", f"signer {kid}"]
    assert main(["bundle", "verify", str(copy)]) == 0  # without keys the signature is not checked
    assert "not checked" in capsys.readouterr().out
    assert main(["bundle", "sign", str(copy), "--key", str(pub)]) == 2  # the public half
    assert "not a readable, unencrypted Ed25519 private key" in capsys.readouterr().err

    edit(copy, lambda d: d.update(element="Fe"))
    assert main(["bundle", "seal", str(copy)]) == 1
    assert capsys.readouterr().err.startswith("digest_mismatch: ")
    assert main(["bundle", "seal", str(copy), "--force"]) == 0
    capsys.readouterr()
    assert main(args) == 1  # resealed, but the signature no longer verifies
    assert capsys.readouterr().err.startswith("signature_invalid: ")


def test_bundle_verify_requiring_a_signature_without_a_key_is_a_usage_error(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bundle verify DIR --require-signature`` with no ``--trusted-key`` judged the bundle:
    "signature_missing: ...: signed bundles are required but no trusted public key is
    configured", exit 1, as if the bundle lacked something and in the daemon's words (there
    is no configuration here). Expected: what the command needs, exit 2, nothing judged."""
    from xasflow.cli import main

    assert main(["bundle", "verify", str(copy), "--require-signature"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "xasflow: error: --require-signature needs the public key to check the signature "
        "with: give --trusted-key PUB.pem\n"
    )


def test_bundle_verbs_say_a_path_problem_plainly(
    copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file given as a bundle, a key that is not there or is a directory, a key pair into a
    folder that is not there: each printed Python's errno text ("unreadable bundle directory:
    [Errno 20] Not a directory: '...'", "([Errno 2] No such file or directory: '/nope')").
    Expected: plain words, the exit codes as before."""
    pytest.importorskip("cryptography")
    from xasflow.cli import main

    afile, folder = tmp_path / "cu-k.zip", tmp_path / "keys"
    afile.write_bytes(b"PK")
    folder.mkdir()
    assert main(["bundle", "verify", str(afile)]) == 1
    said = "not a directory (a bundle is a directory holding manifest.json)"
    assert capsys.readouterr().err == f"invalid: {afile}: {said}\n"
    assert main(["predict", "--bundle", str(afile), str(afile)]) == 2
    assert capsys.readouterr().err == f"xasflow: error: {afile}: {said}\n"
    missing = tmp_path / "missing.key"
    assert main(["bundle", "sign", str(copy), "--key", str(missing)]) == 2
    private = "not a readable, unencrypted Ed25519 private key"
    assert capsys.readouterr().err == f"xasflow: error: {missing}: {private} (no such file)\n"
    assert main(["bundle", "sign", str(copy), "--key", str(folder)]) == 2
    assert capsys.readouterr().err == f"xasflow: error: {folder}: {private} (is a directory)\n"
    assert main(["bundle", "verify", str(copy), "--trusted-key", str(missing)]) == 2
    public = "not a readable Ed25519 public key (no such file)"
    assert capsys.readouterr().err == f"xasflow: error: {missing}: {public}\n"
    assert main(["bundle", "keygen", str(tmp_path / "nope" / "facility")]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"xasflow: error: cannot write the key pair: no such directory {tmp_path / 'nope'}\n"
    )


def test_a_graph_swapped_after_the_check_is_refused_at_load(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The predictor hashes the bytes it loads: a file replaced between the bundle's
    verification and the read (someone writing into the models directory) is not served."""
    import xasflow.models.predictor as predictor_module
    from xasflow.models.predictor import Predictor

    checked = predictor_module.verify_bundle

    def then_swapped(directory: Path, **kw: Any) -> Any:
        manifest = checked(directory, **kw)
        victim = sorted(manifest.graph_files())[0]
        data = bytearray((Path(directory) / victim).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (Path(directory) / victim).write_bytes(bytes(data))
        return manifest

    monkeypatch.setattr(predictor_module, "verify_bundle", then_swapped)
    with pytest.raises(BundleError, match="changed after the bundle was verified") as err:
        Predictor(copy)
    assert err.value.reason == "file_mismatch"
