"""``xasflow predict`` and the file readers it uses, on crafted files: each test states the
behaviour a user should get, and each failed on the code it was written against. The verbs as
a whole (evaluate's reference tables, train's refusals, --json, the help) are
``test_cli_commands``."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import strict_json

from xasflow import paths
from xasflow.cli import main

BUNDLE = paths.REPO_ROOT / "models" / "cu-k"


def _predict(tmp_path: Path, *files: Path | str, extra: tuple[str, ...] = ()) -> tuple[int, dict]:
    out = tmp_path / f"pred{len(list(tmp_path.iterdir()))}.json"
    rc = main(["predict", "--bundle", str(BUNDLE), *map(str, files), *extra, "--json", str(out)])
    return rc, strict_json(out.read_text())


# --- xasflow predict: the column reader -------------------------------------------------------


def test_two_column_bom_keeps_first_data_row(cuo_columns: Path, tmp_path: Path) -> None:
    """A UTF-8 BOM (Notepad, Excel "CSV UTF-8") must not cost a data row: columns.py decodes
    with "utf-8", so the BOM glues onto the first number, that row fails float() and is
    silently taken for the one allowed header row (398 -> 397 points, answer shifts)."""
    from xasflow.adapters.columns import read_two_column

    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + cuo_columns.read_bytes())
    assert read_two_column(bom).energy.size == read_two_column(cuo_columns).energy.size


def test_two_column_bom_with_comment_and_header_is_read(cuo_columns: Path, tmp_path: Path) -> None:
    """BOM + '# comment' + 'energy,mu' header (a spreadsheet export) must be predicted: now the
    BOM hides the '#', the comment is eaten as the header, and the real header is refused."""
    f = tmp_path / "excel.csv"
    rows = cuo_columns.read_text().replace(" ", ",")
    f.write_bytes(b"\xef\xbb\xbf# CuO, exported\nenergy,mu\n" + rows.encode())
    rc, out = _predict(tmp_path, f)
    assert rc == 0 and "error" not in out[str(f)]


def test_stray_zero_row_does_not_silently_change_the_answer(
    cuo_columns: Path, tmp_path: Path
) -> None:
    """A trailing '0 0' row (an aborted point, a DAQ's padding) lies 9 keV below the edge; the
    pre-edge fit's default range (pre1 from the *second* point) then reaches it and the answer
    changes (CN 5 -> 6, OOD score 0.63 -> 0.22, exit 0). Expected: the point ignored (same
    answer) or the file refused (exit 1) - not a different answer given silently."""
    padded = tmp_path / "padded.txt"
    padded.write_text(cuo_columns.read_text() + "0 0\n")
    rc0, plain = _predict(tmp_path, cuo_columns)
    rc1, stray = _predict(tmp_path, padded)
    assert rc0 == 0
    if rc1 == 0:
        a, b = plain[str(cuo_columns)], stray[str(padded)]
        assert b["tasks"]["cn"]["value"] == a["tasks"]["cn"]["value"]
        assert b["ood_score"] == pytest.approx(a["ood_score"], rel=1e-3)


def test_named_channel_columns_are_predicted_as_the_xdi_file(cuo_xdi: Path, tmp_path: Path) -> None:
    """A text file headed 'energy i0 itrans irefer' (CuO's channels, no XDI header): mu is
    ln(i0/itrans), as from the XDI file. The reader took i0 for mu and the file was refused
    as "edge_step: edge step ... is not positive", a reason that does not say why."""
    from xasflow.adapters.xdi import read_xdi

    x = read_xdi(cuo_xdi)
    named = tmp_path / "cuo_channels.txt"
    rows = "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in x.data)
    named.write_text("energy i0 itrans irefer\n" + rows)
    rc, out = _predict(tmp_path, cuo_xdi, named)
    assert rc == 0, out[str(named)]
    a, b = out[str(cuo_xdi)], out[str(named)]
    assert b["tasks"]["cn"]["value"] == a["tasks"]["cn"]["value"]
    assert b["e0"] == pytest.approx(a["e0"], abs=0.01)
    assert b["ood_score"] == pytest.approx(a["ood_score"], rel=1e-3)
    unnamed = tmp_path / "cuo_counts.txt"
    unnamed.write_text("energy i0 counts\n" + rows)
    rc, out = _predict(tmp_path, unnamed)
    assert rc == 1
    assert out[str(unnamed)]["error"] == "ColumnFileError"
    assert "['energy', 'i0', 'counts']" in out[str(unnamed)]["detail"]


def test_measured_holds_a_file_of_mu_to_a_measured_scans_start(
    cuo_columns: Path, tmp_path: Path
) -> None:
    """CuO as energy and mu, cut to start at 8985 eV (on its edge): the guess takes it for a
    calculation and predicts it with E0 on a later rise (CN 6, p ~0.9, no flag); with
    ``--measured`` it is refused as the XDI file cut alike is. ``--measured`` and
    ``--calculated`` exclude each other."""
    rows = [ln for ln in cuo_columns.read_text().splitlines() if float(ln.split()[0]) >= 8985.0]
    cut = tmp_path / "cuo_cut.txt"
    cut.write_text("\n".join(rows) + "\n")
    rc, out = _predict(tmp_path, cut)
    assert rc == 0 and out[str(cut)]["e0"] > 8989.0  # the guess: its E0 on a later rise
    rc, out = _predict(tmp_path, cut, extra=("--measured",))
    assert rc == 1 and out[str(cut)]["error"] == "no_pre_edge", out
    rc, out = _predict(tmp_path, cuo_columns, extra=("--measured",))  # a whole scan: as before
    assert rc == 0 and 8983.0 < out[str(cuo_columns)]["e0"] < 8985.0
    with pytest.raises(SystemExit):
        main(["predict", str(cut), "--measured", "--calculated"])


# --- xasflow predict: XDI -------------------------------------------------------------------


def test_xdi_named_non_herfd_is_not_broadened(cuo_xdi: Path, tmp_path: Path) -> None:
    """XdiFile.herfd documents that "non-HERFD" text is not a HERFD declaration, but the
    negation regex needs a word boundary, which '_' (a word character) never gives: a file
    named CuO_non-herfd.xdi is broadened as HERFD (E0 +6.7 eV, another CN, exit 0)."""
    named = tmp_path / "CuO_non-herfd.xdi"
    named.write_bytes(cuo_xdi.read_bytes())
    rc, out = _predict(tmp_path, named)
    assert rc == 0
    assert out[str(named)]["herfd"] is False


# --- xasflow predict: what the text says ----------------------------------------------------


def _line(out: str, task: str) -> str:
    (line,) = [x for x in out.splitlines() if x.lstrip().startswith(f"{task} ")]
    return line


def _numbers(text: str) -> list[float]:
    return [float(x.rsplit(" ", 1)[-1]) for x in text.split(", ")]


def test_a_models_directory_given_as_the_bundle_names_its_bundles(
    cuo_xdi: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--bundle models`` (the daemon's ``models.directory``, which holds bundles) said "no
    manifest.json; not a model bundle (or a partial copy)". Expected: that it holds bundles,
    and which to give."""
    capsys.readouterr()
    assert main(["predict", "--bundle", str(BUNDLE.parent), str(cuo_xdi)]) == 2
    err = capsys.readouterr().err
    assert f"{BUNDLE.parent}: a models directory, not a bundle: give one of its bundles" in err
    assert f"(--bundle {BUNDLE})" in err


def test_a_herfd_width_out_of_range_is_said_once(
    cuo_xdi: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--herfd=0.1`` said "argument --herfd: --herfd: a HERFD FWHM must be within 0.2..50
    eV, not 0.1" (and "argument --herfd: --herfd takes a FWHM ..." for a word): argparse
    names the argument, and _fwhm named it again. Expected: once."""
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(cuo_xdi), "--herfd=0.1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "error: argument --herfd: a HERFD FWHM must be within 0.2..50 eV, not 0.1\n" in err
    assert err.count("--herfd:") == 1
    with pytest.raises(SystemExit):  # a file taken for the width: where to put the flag
        main(["predict", "--herfd", str(cuo_xdi)])
    err = capsys.readouterr().err
    assert f"error: argument --herfd: expected a FWHM in eV, not '{cuo_xdi}' (put the" in err


def test_an_answer_the_cn_chose_says_so_before_its_scores_highest_first(
    xdi_library: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cu2S at 13 K (out of domain): the CN answer (3) chooses the environment answer, which
    the motif regressor scores 0.01 and the environment classifier 0.08. The motifs line read
    "CN3-trigonal planar (ranking: CN3-trigonal planar 0.01, CN4-see-saw-like 0.19, ...)": the
    answer led scores higher than its own, and nothing said what they were. Expected: each
    line says why its answer was chosen and its own figure, then the figures named and in
    descending order; the values and JSON as before (the ranking led by the answer)."""
    cu2s = xdi_library / "Cu" / "Cu2S_13K_01.xdi"
    rc, out = _predict(tmp_path, cu2s)
    text = capsys.readouterr().out
    tasks = out[str(cu2s)]["tasks"]
    assert rc == 0 and tasks["cn"]["value"] == 3
    answer = tasks["environment"]["value"]
    assert answer == tasks["motifs"]["value"] == tasks["motifs"]["ranking"][0][0]
    own = tasks["motifs"]["ranking"][0][1]
    assert own < max(score for _, score in tasks["motifs"]["ranking"])  # led by the CN answer
    motifs = _line(text, "motifs")
    head = f"motifs       {answer}  (the environment answer, chosen for CN 3, the CN answer: "
    assert head + f"order parameter {own:.2f}; motif order parameters, highest first: " in motifs
    scores = _numbers(motifs.split("highest first: ")[1].rstrip(")"))
    assert scores == sorted(scores, reverse=True) and scores[0] > own
    env = _line(text, "environment")
    p = tasks["environment"]["probabilities"][answer]
    assert f"{answer}  (the most probable label of CN 3, the CN answer: p {p:.2f}; " in env
    probs = [
        float(x.rsplit(": ", 1)[1])
        for x in env.split("highest first: ")[1].split(")")[0].split(", ")
    ]
    assert probs == sorted(probs, reverse=True) and probs[0] > p


def test_a_file_the_readers_cannot_read_is_said_plainly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file the readers refuse printed their exception's name ("cannot predict
    (ColumnFileError): no numeric data rows", "(XdiError): data row ..."). Expected: what the
    file is not, then the reader's own words; the JSON keeps the name as its error."""
    empty = tmp_path / "empty.csv"
    empty.write_text("energy,mu\n")
    broken = tmp_path / "broken.xdi"
    broken.write_text(
        "# XDI/1.0\n# Element.symbol: Cu\n# Element.edge: K\n# Column.1: energy eV\n"
        "# Column.2: mutrans\n# ///\n#----\n# energy mutrans\n8900 1.0\n8901\n"
    )
    capsys.readouterr()
    rc, out = _predict(tmp_path, empty, broken)
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{empty}: cannot predict: not a readable spectrum file: no numeric data rows" in err
    assert f"{broken}: cannot predict: not a readable XDI file: data row 2 (near line 10)" in err
    assert "Error" not in err
    assert out[str(empty)]["error"] == "ColumnFileError"
    assert out[str(broken)]["error"] == "XdiError"


def test_a_compressed_or_utf16_file_is_said_to_be_no_text(
    cuo_columns: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gzipped scan was refused as "the header names the columns ['y'], which does not say
    what mu is", and a UTF-16 export (Windows "Unicode text") as naming the columns
    ['8760019', '15225270000015634']: the bytes decoded as UTF-8 with replacements. Expected:
    what the file is, and what to do (unpack it; save it as UTF-8)."""
    import gzip

    packed = tmp_path / "cuo.txt.gz"
    packed.write_bytes(gzip.compress(cuo_columns.read_bytes()))
    wide = tmp_path / "cuo_utf16.txt"
    wide.write_bytes(cuo_columns.read_text().encode("utf-16"))
    capsys.readouterr()
    rc, out = _predict(tmp_path, packed, wide)
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{packed}: cannot predict: not a readable spectrum file: a gzip archive" in err
    assert "unpack it (gunzip) and give the file inside" in err
    assert f"{wide}: cannot predict: not a readable spectrum file: not UTF-8 text" in err
    assert "names the columns" not in err
    assert out[str(packed)]["error"] == out[str(wide)]["error"] == "ColumnFileError"


def test_a_missing_path_or_a_directory_is_said_plainly(
    cuo_xdi: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path that is not there, or a directory, printed Python's exception name and errno
    ("cannot predict (FileNotFoundError): [Errno 2] No such file or directory: ..."). Expected:
    plain words, what to give instead of a directory, and exit 1 as for any file not predicted
    (the JSON's error stays the exception's name, its detail the plain words)."""
    missing, folder = tmp_path / "nope.xdi", tmp_path / "spectra"
    folder.mkdir()
    capsys.readouterr()
    rc, out = _predict(tmp_path, missing, folder, cuo_xdi)
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{missing}: cannot predict: no such file\n" in err
    hint = f"is a directory: give the spectrum files in it (e.g. {folder / '*.xdi'}), not the"
    assert f"{folder}: cannot predict: {hint} directory\n" in err
    assert "Errno" not in err and "Error" not in err
    assert "2 of 3 files could not be predicted" in err
    assert out[str(missing)] == {"error": "FileNotFoundError", "detail": "no such file"}
    assert out[str(folder)]["error"] == "IsADirectoryError"
    assert out[str(folder)]["detail"].startswith("is a directory: give the spectrum files")


def test_a_refusal_names_the_file_once_however_the_path_is_written(
    cuo_xdi: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The readers begin their messages with the path as Path() writes it ("x.xdi" for
    "./x.xdi"), and an XDI file's unit refusal kept its tag, so the file was named twice:
    "./kev.xdi: cannot predict (units): kev.xdi: energies 8.76 to 9.64 declared 'eV' ...".
    Expected: the file named once, before "cannot predict", however it was given."""
    monkeypatch.chdir(tmp_path)
    lines = cuo_xdi.read_text().splitlines(keepends=True)
    kev = [ln if ln.startswith("#") or not ln.strip() else _kev(ln) for ln in lines]
    Path("kev.xdi").write_text("".join(kev))
    Path("hdr.xdi").write_text("".join(ln for ln in lines if ln.startswith("#")))
    capsys.readouterr()
    rc, _ = _predict(tmp_path, "./kev.xdi", "./hdr.xdi", "kev.xdi")
    err = capsys.readouterr().err
    assert rc == 1
    assert "./kev.xdi: cannot predict (units): energies 8.76002 to 9.63889 declared 'eV'" in err
    assert "./hdr.xdi: cannot predict: not a readable XDI file: no data rows\n" in err
    assert "\nkev.xdi: cannot predict (units): energies 8.76002 to" in err
    assert err.count("kev.xdi") == 2 and err.count("hdr.xdi") == 1


def _kev(row: str) -> str:
    """A data row with its energy (first column) in keV."""
    energy, *rest = row.split()
    return " ".join([f"{float(energy) / 1000:.6f}", *rest]) + "\n"
