"""Review of the command-line entry points (``xasflow predict``, ``xasflow evaluate``) and the
file readers they use, on crafted files. Each test states the behaviour a user should get;
each failed on the code it was written against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xasflow import paths
from xasflow.cli import main

BUNDLE = paths.REPO_ROOT / "models" / "cu-k"


def _strict_json(text: str) -> Any:
    """json.loads that refuses NaN/Infinity (not JSON: jq, JavaScript, Go, ... reject them)."""

    def refuse(const: str) -> Any:
        raise ValueError(f"not valid JSON: {const}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def cuo(xdi_library: Path) -> Path:
    return xdi_library / "Cu" / "CuO_tenorite_13K_01.xdi"


@pytest.fixture(scope="module")
def cuo_columns(cuo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CuO tenorite as a plain two-column file (energy eV, ln(i0/itrans))."""
    from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum

    s = xdi_to_spectrum(read_xdi(cuo))
    path = tmp_path_factory.mktemp("cols") / "cuo.txt"
    path.write_text("".join(f"{e:.4f} {m:.6f}\n" for e, m in zip(s.energy, s.mu, strict=True)))
    return path


def _predict(tmp_path: Path, *files: Path | str, extra: tuple[str, ...] = ()) -> tuple[int, dict]:
    out = tmp_path / f"pred{len(list(tmp_path.iterdir()))}.json"
    rc = main(["predict", "--bundle", str(BUNDLE), *map(str, files), *extra, "--json", str(out)])
    return rc, _strict_json(out.read_text())


def _evaluate(tmp_path: Path, table: Path) -> tuple[int, Path]:
    out = tmp_path / "eval.json"
    rc = main(["evaluate", "--bundle", str(BUNDLE), "--data", str(table), "--json", str(out)])
    return rc, out


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


def test_named_channel_columns_are_predicted_as_the_xdi_file(cuo: Path, tmp_path: Path) -> None:
    """A text file headed 'energy i0 itrans irefer' (CuO's channels, no XDI header): mu is
    ln(i0/itrans), as from the XDI file. The reader took i0 for mu and the file was refused
    as "edge_step: edge step ... is not positive", a reason that does not say why."""
    from xasflow.adapters.xdi import read_xdi

    x = read_xdi(cuo)
    named = tmp_path / "cuo_channels.txt"
    rows = "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in x.data)
    named.write_text("energy i0 itrans irefer\n" + rows)
    rc, out = _predict(tmp_path, cuo, named)
    assert rc == 0, out[str(named)]
    a, b = out[str(cuo)], out[str(named)]
    assert b["tasks"]["cn"]["value"] == a["tasks"]["cn"]["value"]
    assert b["e0"] == pytest.approx(a["e0"], abs=0.01)
    assert b["ood_score"] == pytest.approx(a["ood_score"], rel=1e-3)
    unnamed = tmp_path / "cuo_counts.txt"
    unnamed.write_text("energy i0 counts\n" + rows)
    rc, out = _predict(tmp_path, unnamed)
    assert rc == 1
    assert out[str(unnamed)]["error"] == "ColumnFileError"
    assert "['energy', 'i0', 'counts']" in out[str(unnamed)]["detail"]


# --- xasflow predict: XDI -------------------------------------------------------------------


def test_xdi_named_non_herfd_is_not_broadened(cuo: Path, tmp_path: Path) -> None:
    """XdiFile.herfd documents that "non-HERFD" text is not a HERFD declaration, but the
    negation regex needs a word boundary, which '_' (a word character) never gives: a file
    named CuO_non-herfd.xdi is broadened as HERFD (E0 +6.7 eV, another CN, exit 0)."""
    named = tmp_path / "CuO_non-herfd.xdi"
    named.write_bytes(cuo.read_bytes())
    rc, out = _predict(tmp_path, named)
    assert rc == 0
    assert out[str(named)]["herfd"] is False


# --- xasflow predict: what the text says ----------------------------------------------------


def _line(out: str, task: str) -> str:
    (line,) = [x for x in out.splitlines() if x.lstrip().startswith(f"{task} ")]
    return line


def _numbers(text: str) -> list[float]:
    return [float(x.rsplit(" ", 1)[-1]) for x in text.split(", ")]


def test_json_never_overwrites_a_file_that_is_not_json(
    cuo: Path, xdi_library: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``xasflow predict --json a.xdi b.xdi`` (--json before the files, its path forgotten)
    took a.xdi for the output, predicted b.xdi alone and wrote the JSON over the measured
    a.xdi, exit 0. Expected: refused before anything is predicted (exit 2), a.xdi as it was;
    the JSON of an earlier run, or an empty file, is still replaced; evaluate's and train's
    --json alike."""
    spectrum = tmp_path / "a.xdi"
    spectrum.write_bytes(cuo.read_bytes())
    metal = xdi_library / "Cu" / "cu_metal_rt.xdi"
    capsys.readouterr()
    assert main(["predict", "--bundle", str(BUNDLE), "--json", str(spectrum), str(metal)]) == 2
    captured = capsys.readouterr()
    assert spectrum.read_bytes() == cuo.read_bytes()
    assert f"xasflow: error: --json {spectrum}: exists and is not a JSON file" in captured.err
    assert "E0" not in captured.out  # refused before predicting
    table = _table(tmp_path, [f"{cuo},Cu,4,square co-planar,2,1.96"])
    assert (
        main(["evaluate", "--bundle", str(BUNDLE), "--data", str(table), "--json", str(spectrum)])
        == 2
    )
    assert main(["train", "--out", str(tmp_path / "b"), "--json", str(spectrum)]) == 2
    assert spectrum.read_bytes() == cuo.read_bytes()
    earlier, empty = tmp_path / "pred.json", tmp_path / "empty.json"
    earlier.write_text('{"old": 1}\n')
    empty.touch()
    for out in (earlier, empty):
        assert main(["predict", "--bundle", str(BUNDLE), str(metal), "--json", str(out)]) == 0
        assert list(_strict_json(out.read_text())) == [str(metal)]


def test_a_models_directory_given_as_the_bundle_names_its_bundles(
    cuo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--bundle models`` (the daemon's ``models.directory``, which holds bundles) said "no
    manifest.json; not a model bundle (or a partial copy)". Expected: that it holds bundles,
    and which to give."""
    capsys.readouterr()
    assert main(["predict", "--bundle", str(BUNDLE.parent), str(cuo)]) == 2
    err = capsys.readouterr().err
    assert f"{BUNDLE.parent}: a models directory, not a bundle: give one of its bundles" in err
    assert f"(--bundle {BUNDLE})" in err


def test_a_herfd_width_out_of_range_is_said_once(
    cuo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--herfd=0.1`` said "argument --herfd: --herfd: a HERFD FWHM must be within 0.2..50
    eV, not 0.1" (and "argument --herfd: --herfd takes a FWHM ..." for a word): argparse
    names the argument, and _fwhm named it again. Expected: once."""
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(cuo), "--herfd=0.1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "error: argument --herfd: a HERFD FWHM must be within 0.2..50 eV, not 0.1\n" in err
    assert err.count("--herfd:") == 1
    with pytest.raises(SystemExit):  # a file taken for the width: where to put the flag
        main(["predict", "--herfd", str(cuo)])
    err = capsys.readouterr().err
    assert f"error: argument --herfd: expected a FWHM in eV, not '{cuo}' (put the" in err


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
    cuo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path that is not there, or a directory, printed Python's exception name and errno
    ("cannot predict (FileNotFoundError): [Errno 2] No such file or directory: ..."). Expected:
    plain words, what to give instead of a directory, and exit 1 as for any file not predicted
    (the JSON's error stays the exception's name, its detail the plain words)."""
    missing, folder = tmp_path / "nope.xdi", tmp_path / "spectra"
    folder.mkdir()
    capsys.readouterr()
    rc, out = _predict(tmp_path, missing, folder, cuo)
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
    cuo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The readers begin their messages with the path as Path() writes it ("x.xdi" for
    "./x.xdi"), and an XDI file's unit refusal kept its tag, so the file was named twice:
    "./kev.xdi: cannot predict (units): kev.xdi: energies 8.76 to 9.64 declared 'eV' ...".
    Expected: the file named once, before "cannot predict", however it was given."""
    monkeypatch.chdir(tmp_path)
    lines = cuo.read_text().splitlines(keepends=True)
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


# --- xasflow evaluate on a measured reference table -----------------------------------------


def _table(tmp_path: Path, rows: list[str], name: str = "refs.csv") -> Path:
    table = tmp_path / name
    table.write_text("file,element,cn,motif,valence,distance\n" + "".join(r + "\n" for r in rows))
    return table


def test_evaluate_and_generate_say_a_path_problem_plainly(
    cuo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Paths the verbs cannot use: a table row naming a missing file or a directory was
    skipped with "[Errno 2] No such file or directory: '...'"; ``--report`` naming a file
    ended in a FileExistsError traceback after the scoring; ``--json`` below a file said
    "File exists"; ``dataset generate --out`` a file printed "[Errno 17] File exists: '...'".
    Expected: plain words, exit 2 for what the user must fix, no traceback."""
    missing, folder, afile = tmp_path / "nope.xdi", tmp_path / "spectra", tmp_path / "notes.txt"
    folder.mkdir()
    afile.write_text("x")
    rows = [f"{cuo},Cu,4,square co-planar,2,1.96"]
    rows += [f"{p},Cu,4,square co-planar,2,1.96" for p in (missing, folder)]
    table = _table(tmp_path, rows)
    capsys.readouterr()
    assert _evaluate(tmp_path, table)[0] == 0
    out = capsys.readouterr().out
    assert f"refs.csv:3: bad_reference: {missing}: no such file\n" in out
    assert f"refs.csv:4: bad_reference: {folder}: is a directory\n" in out
    args = ["evaluate", "--bundle", str(BUNDLE), "--data", str(table)]
    assert main([*args, "--report", str(afile)]) == 2
    said = "(it gets report.md and the plots)"
    assert capsys.readouterr().err == f"xasflow: error: --report {afile}: not a directory {said}\n"
    assert main([*args, "--report", str(afile / "report")]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"xasflow: error: cannot write --report {afile / 'report'}: a folder on its path is a file\n"
    )
    assert main([*args, "--json", str(afile / "eval.json")]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"--json {afile / 'eval.json'}: {afile}: exists and is not a directory\n")
    generate = ["dataset", "generate", "--element", "Cu", "--structures", str(folder)]
    assert main([*generate, "--out", str(afile)]) == 2
    assert capsys.readouterr().err == f"xasflow: error: {afile}: exists and is not a directory\n"


def test_evaluate_json_has_no_nan(cuo: Path, tmp_path: Path) -> None:
    """One reference with a distance: r2 is undefined and written as a bare NaN, so
    ``--json`` is not JSON (json.dumps without allow_nan=False). Expected: null."""
    rc, out = _evaluate(tmp_path, _table(tmp_path, [f"{cuo},Cu,4,square co-planar,2,1.96"]))
    assert rc == 0
    _strict_json(out.read_text())


def test_evaluate_says_what_it_scored_of_a_reference_table(
    cuo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A measured table is scored whole (Evaluation.scope "external"), and evaluate printed
    that word as if it named a part: "scored the external: 1 spectra of 1 materials".
    Expected: what was scored in words, as "scored the test split: ..." says it."""
    capsys.readouterr()
    rc, _ = _evaluate(tmp_path, _table(tmp_path, [f"{cuo},Cu,4,square co-planar,2,1.96"]))
    out = capsys.readouterr().out
    assert rc == 0
    assert "scored the external data (all of it, none trained on): 1 spectra of 1 materials" in out


def test_evaluate_mixed_element_table_scores_only_the_bundle_element(
    cuo: Path, xdi_library: Path, tmp_path: Path
) -> None:
    """A table of Cu and Ni references: the Ni spectrum is prepared at the Ni edge and scored
    by the Cu bundle ("scored 2 spectra"), silently polluting the metrics. Expected: the Ni
    row is an issue (or the table refused), 1 spectrum scored."""
    ni = sorted((xdi_library / "Ni").glob("*.xdi"))[0]
    table = _table(
        tmp_path, [f"{cuo},Cu,4,square co-planar,2,1.96", f"{ni},Ni,6,octahedral,2,2.08"]
    )
    rc, out = _evaluate(tmp_path, table)
    if rc == 0:
        assert _strict_json(out.read_text())["n_spectra"] == 1


@pytest.mark.parametrize("first", ["ni", "blank_element"])
def test_evaluate_table_of_another_element_is_a_clean_error(
    first: str, cuo_columns: Path, xdi_library: Path, tmp_path: Path
) -> None:
    """First row Ni (or a two-column file with the element cell empty): evaluate_bundle raises
    ValueError("bundle is for Cu, data is Ni" / "data is ") and the user gets a traceback.
    Expected: 'xasflow: error: ...' and exit 2, like every other refused --data."""
    ni = sorted((xdi_library / "Ni").glob("*.xdi"))[0]
    row = f"{ni},Ni,6,octahedral,2,2.08" if first == "ni" else f"{cuo_columns},,4,,2,"
    assert _evaluate(tmp_path, _table(tmp_path, [row]))[0] == 2


def test_evaluate_table_with_no_preparable_spectrum_is_a_clean_error(
    tmp_path: Path,
) -> None:
    """Every reference refused by preparation (here a flat line): NoTestRows escapes as a
    traceback. Expected: 'xasflow: error: ...' and exit 2."""
    flat = tmp_path / "flat.txt"
    energy = np.arange(8800.0, 9300.0, 1.0)
    np.savetxt(flat, np.column_stack([energy, np.ones_like(energy)]))
    assert _evaluate(tmp_path, _table(tmp_path, [f"{flat},Cu,4,,,"]))[0] == 2


def test_evaluate_names_each_reference_its_preparation_refused(
    cuo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A table of CuO and a flat line: the flat one is refused by preparation and only
    counted (``issues: {no_edge: 1}``), so the user cannot tell which reference was left
    out. Expected: its file and reason printed, as for rows the table reader skips."""
    flat = tmp_path / "flat.txt"
    energy = np.arange(8800.0, 9300.0, 1.0)
    np.savetxt(flat, np.column_stack([energy, np.ones_like(energy)]))
    table = _table(tmp_path, [f"{cuo},Cu,4,square co-planar,2,1.96", f"{flat},Cu,4,,,"])
    capsys.readouterr()
    rc, out = _evaluate(tmp_path, table)
    assert rc == 0
    report = _strict_json(out.read_text())
    assert report["n_spectra"] == 1
    (reason,) = report["issues"]
    printed = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(printed) == 1, printed
    assert str(flat) in printed[0] and reason in printed[0]


def test_evaluate_non_utf8_table_is_a_clean_error(cuo: Path, tmp_path: Path) -> None:
    """A Latin-1 table (a Windows spreadsheet, an accented sample name): UnicodeDecodeError
    traceback from csv.DictReader. Expected: read it, or 'xasflow: error' and exit 2."""
    table = tmp_path / "refs.csv"
    table.write_bytes(
        b"file,element,cn,motif,valence,distance,sample\n"
        + f"{cuo},Cu,4,square co-planar,2,1.96,".encode()
        + b"oxyde de cuivre (\xe9chantillon)\n"
    )
    assert _evaluate(tmp_path, table)[0] in (0, 2)


def test_evaluate_table_with_bom_is_read(cuo: Path, tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a BOM: the first field name becomes '\\ufefffile' and the
    table is refused with "missing columns ['file']" although it has one. Expected: read."""
    table = tmp_path / "refs.csv"
    body = f"file,element,cn,motif,valence,distance\n{cuo},Cu,4,square co-planar,2,1.96\n"
    table.write_bytes(b"\xef\xbb\xbf" + body.encode())
    rc, out = _evaluate(tmp_path, table)
    assert rc == 0 and out.is_file()


def test_evaluate_uppercase_csv_suffix_is_a_reference_table(cuo: Path, tmp_path: Path) -> None:
    """refs.CSV (Windows) is taken for a FEFF tree and refused as "neither a directory nor a
    .tar.gz": load_dataset compares Path.suffix case-sensitively. Expected: read as a table."""
    table = _table(tmp_path, [f"{cuo},Cu,4,square co-planar,2,1.96"], name="REFS.CSV")
    assert _evaluate(tmp_path, table)[0] == 0


def test_train_refuses_an_out_folder_that_is_not_a_bundle_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``xasflow train --out DIR`` replaces DIR whole: a DIR holding other files is refused
    (exit 2) before the data are even read, and nothing in it is touched."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    rc = main(["train", "--data", str(tmp_path / "no-such-data"), "--out", str(out)])
    assert rc == 2
    assert "--out" in capsys.readouterr().err  # refused for --out, before the missing data
    assert (out / "thesis.tex").read_text() == "years of work"


def test_train_refuses_an_unknown_network_device_before_reading_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "b"), "--device", "tpu"]
    )
    assert rc == 2
    assert "--device" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli() -> None:
    """``python -m xasflow`` is the console script: the same parser, and its exit status."""
    import subprocess
    import sys

    ok = subprocess.run(
        [sys.executable, "-m", "xasflow", "--help"], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0 and ok.stdout.startswith("usage: xasflow ")
    bad = subprocess.run(
        [sys.executable, "-m", "xasflow", "predict", "/nonexistent/scan.xdi"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1, bad.stderr  # the per-file failure status, passed through
    assert "1 of 1 files could not be predicted" in bad.stdout + bad.stderr


def test_every_argument_of_every_verb_says_what_it_is_in_its_help() -> None:
    """``xasflow bundle verify --help`` listed ``--require-signature`` with no words and
    ``--trusted-key PUB.pem`` as "repeatable", and seal, sign, verify and keygen their
    positional argument bare: what a key is trusted for, or what keygen's PREFIX becomes,
    was for the README to say. Expected: every argument of every verb has a help text."""
    import argparse

    from xasflow.cli import build_parser

    bare: list[str] = []

    def walk(parser: argparse.ArgumentParser, verb: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{verb} {name}".strip())
            elif not action.help:
                bare.append(f"{verb} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "")
    assert bare == []


def test_output_piped_into_a_reader_that_stops_is_no_traceback(cuo: Path) -> None:
    """``xasflow predict *.xdi | head -2`` ended in a BrokenPipeError traceback once head had
    its lines (print to a closed pipe). Expected: the command stops quietly, as Unix tools
    do, with a shell's status for it (141); here the pipe is closed before the command
    writes anything."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: every write fails, EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "xasflow", "predict", "--bundle", str(BUNDLE), str(cuo)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 128 + 13


@pytest.mark.parametrize(
    ("argv", "verbs"),
    [
        ([], "{train,evaluate,predict,dataset,bundle,serve,demo}"),
        (["dataset"], "{fetch-mp,build,generate}"),
        (["bundle"], "{seal,sign,verify,keygen}"),
    ],
)
def test_a_missing_verb_is_said_by_the_verbs_to_give(
    argv: list[str], verbs: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``xasflow`` alone said "the following arguments are required: cmd", ``xasflow
    dataset`` "... dataset_cmd": the parser's internal names. Expected: the verbs to choose
    from, as the usage line lists them."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert f"error: the following arguments are required: {verbs}\n" in err
    assert f"{verbs} ..." in err  # the usage line, as before


def test_the_help_has_no_docstring_markup(capsys: pytest.CaptureFixture[str]) -> None:
    """``xasflow --help`` began "The ``xasflow`` command: ...", the module docstring's reST
    quoting. Expected: plain words."""
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "The xasflow command: train, evaluate and use models" in out and "``" not in out
