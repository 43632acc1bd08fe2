"""The command line's verbs as a whole (``xasflow evaluate`` on measured reference tables,
``train``'s refusals before any work, ``--json`` never written over a spectrum, ``-m``, the
help, a reader that stops): each test states what a user should get, and each failed on the
code it was written against. Predicting single files is ``test_cli_inputs``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import strict_json

from xasflow import paths
from xasflow.cli import main

BUNDLE = paths.REPO_ROOT / "models" / "cu-k"


def _evaluate(tmp_path: Path, table: Path) -> tuple[int, Path]:
    out = tmp_path / "eval.json"
    rc = main(["evaluate", "--bundle", str(BUNDLE), "--data", str(table), "--json", str(out)])
    return rc, out


def test_json_never_overwrites_a_file_that_is_not_json(
    cuo_xdi: Path, xdi_library: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``xasflow predict --json a.xdi b.xdi`` (--json before the files, its path forgotten)
    took a.xdi for the output, predicted b.xdi alone and wrote the JSON over the measured
    a.xdi, exit 0. Expected: refused before anything is predicted (exit 2), a.xdi as it was;
    the JSON of an earlier run, or an empty file, is still replaced; evaluate's and train's
    --json alike."""
    spectrum = tmp_path / "a.xdi"
    spectrum.write_bytes(cuo_xdi.read_bytes())
    metal = xdi_library / "Cu" / "cu_metal_rt.xdi"
    capsys.readouterr()
    assert main(["predict", "--bundle", str(BUNDLE), "--json", str(spectrum), str(metal)]) == 2
    captured = capsys.readouterr()
    assert spectrum.read_bytes() == cuo_xdi.read_bytes()
    assert f"xasflow: error: --json {spectrum}: exists and is not a JSON file" in captured.err
    assert "E0" not in captured.out  # refused before predicting
    table = _table(tmp_path, [f"{cuo_xdi},Cu,4,square co-planar,2,1.96"])
    assert (
        main(["evaluate", "--bundle", str(BUNDLE), "--data", str(table), "--json", str(spectrum)])
        == 2
    )
    assert main(["train", "--out", str(tmp_path / "b"), "--json", str(spectrum)]) == 2
    assert spectrum.read_bytes() == cuo_xdi.read_bytes()
    earlier, empty, bom = tmp_path / "pred.json", tmp_path / "empty.json", tmp_path / "b.json"
    earlier.write_text('{"old": 1}\n')
    empty.touch()
    bom.write_bytes(b'\xef\xbb\xbf{"old": 1}\n')  # saved by an editor with a BOM: JSON still
    for out in (earlier, empty, bom):
        assert main(["predict", "--bundle", str(BUNDLE), str(metal), "--json", str(out)]) == 0
        assert list(strict_json(out.read_text())) == [str(metal)]


# --- xasflow evaluate on a measured reference table -----------------------------------------


def _table(tmp_path: Path, rows: list[str], name: str = "refs.csv") -> Path:
    table = tmp_path / name
    table.write_text("file,element,cn,motif,valence,distance\n" + "".join(r + "\n" for r in rows))
    return table


def test_evaluate_and_generate_say_a_path_problem_plainly(
    cuo_xdi: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Paths the verbs cannot use: a table row naming a missing file or a directory was
    skipped with "[Errno 2] No such file or directory: '...'"; ``--report`` naming a file
    ended in a FileExistsError traceback after the scoring; ``--json`` below a file said
    "File exists"; ``dataset generate --out`` a file printed "[Errno 17] File exists: '...'".
    Expected: plain words, exit 2 for what the user must fix, no traceback."""
    missing, folder, afile = tmp_path / "nope.xdi", tmp_path / "spectra", tmp_path / "notes.txt"
    folder.mkdir()
    afile.write_text("x")
    rows = [f"{cuo_xdi},Cu,4,square co-planar,2,1.96"]
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


def test_evaluate_json_has_no_nan(cuo_xdi: Path, tmp_path: Path) -> None:
    """One reference with a distance: r2 is undefined and written as a bare NaN, so
    ``--json`` is not JSON (json.dumps without allow_nan=False). Expected: null."""
    rc, out = _evaluate(tmp_path, _table(tmp_path, [f"{cuo_xdi},Cu,4,square co-planar,2,1.96"]))
    assert rc == 0
    strict_json(out.read_text())


def test_evaluate_says_what_it_scored_of_a_reference_table(
    cuo_xdi: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A measured table is scored whole (Evaluation.scope "external"), and evaluate printed
    that word as if it named a part: "scored the external: 1 spectra of 1 materials".
    Expected: what was scored in words, as "scored the test split: ..." says it."""
    capsys.readouterr()
    rc, _ = _evaluate(tmp_path, _table(tmp_path, [f"{cuo_xdi},Cu,4,square co-planar,2,1.96"]))
    out = capsys.readouterr().out
    assert rc == 0
    assert "scored the external data (all of it, none trained on): 1 spectra of 1 materials" in out


def test_evaluate_mixed_element_table_scores_only_the_bundle_element(
    cuo_xdi: Path, xdi_library: Path, tmp_path: Path
) -> None:
    """A table of Cu and Ni references: the Ni spectrum is prepared at the Ni edge and scored
    by the Cu bundle ("scored 2 spectra"), silently polluting the metrics. Expected: the Ni
    row is an issue (or the table refused), 1 spectrum scored."""
    ni = sorted((xdi_library / "Ni").glob("*.xdi"))[0]
    table = _table(
        tmp_path, [f"{cuo_xdi},Cu,4,square co-planar,2,1.96", f"{ni},Ni,6,octahedral,2,2.08"]
    )
    rc, out = _evaluate(tmp_path, table)
    if rc == 0:
        assert strict_json(out.read_text())["n_spectra"] == 1


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
    cuo_xdi: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A table of CuO and a flat line: the flat one is refused by preparation and only
    counted (``issues: {no_edge: 1}``), so the user cannot tell which reference was left
    out. Expected: its file and reason printed, as for rows the table reader skips."""
    flat = tmp_path / "flat.txt"
    energy = np.arange(8800.0, 9300.0, 1.0)
    np.savetxt(flat, np.column_stack([energy, np.ones_like(energy)]))
    table = _table(tmp_path, [f"{cuo_xdi},Cu,4,square co-planar,2,1.96", f"{flat},Cu,4,,,"])
    capsys.readouterr()
    rc, out = _evaluate(tmp_path, table)
    assert rc == 0
    report = strict_json(out.read_text())
    assert report["n_spectra"] == 1
    (reason,) = report["issues"]
    printed = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(printed) == 1, printed
    assert str(flat) in printed[0] and reason in printed[0]


def test_evaluate_non_utf8_table_is_a_clean_error(cuo_xdi: Path, tmp_path: Path) -> None:
    """A Latin-1 table (a Windows spreadsheet, an accented sample name): UnicodeDecodeError
    traceback from csv.DictReader. Expected: read it, or 'xasflow: error' and exit 2."""
    table = tmp_path / "refs.csv"
    table.write_bytes(
        b"file,element,cn,motif,valence,distance,sample\n"
        + f"{cuo_xdi},Cu,4,square co-planar,2,1.96,".encode()
        + b"oxyde de cuivre (\xe9chantillon)\n"
    )
    assert _evaluate(tmp_path, table)[0] in (0, 2)


def test_evaluate_table_with_bom_is_read(cuo_xdi: Path, tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a BOM: the first field name becomes '\\ufefffile' and the
    table is refused with "missing columns ['file']" although it has one. Expected: read."""
    table = tmp_path / "refs.csv"
    body = f"file,element,cn,motif,valence,distance\n{cuo_xdi},Cu,4,square co-planar,2,1.96\n"
    table.write_bytes(b"\xef\xbb\xbf" + body.encode())
    rc, out = _evaluate(tmp_path, table)
    assert rc == 0 and out.is_file()


def test_evaluate_uppercase_csv_suffix_is_a_reference_table(cuo_xdi: Path, tmp_path: Path) -> None:
    """refs.CSV (Windows) is taken for a FEFF tree and refused as "neither a directory nor a
    .tar.gz": load_dataset compares Path.suffix case-sensitively. Expected: read as a table."""
    table = _table(tmp_path, [f"{cuo_xdi},Cu,4,square co-planar,2,1.96"], name="REFS.CSV")
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


def test_output_piped_into_a_reader_that_stops_is_no_traceback(
    cuo_xdi: Path, tmp_path: Path
) -> None:
    """``xasflow predict *.xdi | head -2`` ended in a BrokenPipeError traceback once head had
    its lines (print to a closed pipe), and then (a8cc986) in a quiet exit 141 that left the
    ``--json`` file unwritten. Expected: no traceback, the command goes on without stdout and
    writes its JSON, with its own status; here the pipe is closed before the first line."""
    import os
    import subprocess
    import sys

    out = tmp_path / "pred.json"
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: every write fails, EPIPE
    argv = ["predict", "--bundle", str(BUNDLE), str(cuo_xdi), "--json", str(out)]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "xasflow", *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert strict_json(out.read_text())[str(cuo_xdi)]["tasks"]["cn"]["value"] == 4


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
