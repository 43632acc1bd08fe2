"""The benches' shared ending (bench/report.py): the same JSON file and printout as the lines
each bench had before, so their reports in bench/results/ keep their form."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # last: shadows nothing

from report import write_json, write_report  # bench/report.py

REPORT = {
    "benchmark": "example",
    "machine": {"cpus": 2, "loadavg": [1.5, 2.25, 0.0]},
    "levels": [{"rate_hz": 500, "p99_ms": 12.5, "lost": 0, "ok": True}, {"note": None}],
    "bundle_path": Path("/opt/models/cu-k"),
    "text": "Cu K-edge, 8979 eV ± 2",
}


def _old_tail(path: Path, report: dict[str, object], default: object = None) -> str:
    """The lines the benches ended with (bench/nn.py, kafka.py with default=str ...)."""
    text = json.dumps(report, indent=2, default=default)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return text


def test_the_file_is_the_one_the_benches_wrote(tmp_path: Path) -> None:
    plain = {k: v for k, v in REPORT.items() if k != "bundle_path"}
    _old_tail(tmp_path / "old" / "plain.json", plain)
    _old_tail(tmp_path / "old" / "paths.json", REPORT, default=str)
    assert write_json(tmp_path / "new" / "plain.json", plain) == tmp_path / "new" / "plain.json"
    write_json(tmp_path / "new" / "paths.json", REPORT, default=str)
    for name in ("plain.json", "paths.json"):
        old = (tmp_path / "old" / name).read_bytes()
        assert (tmp_path / "new" / name).read_bytes() == old
    text = (tmp_path / "new" / "paths.json").read_text()
    assert text.endswith("}\n") and '\n  "bundle_path": "/opt/models/cu-k",\n' in text
    with pytest.raises(TypeError, match="PosixPath"):  # as json.dumps without default
        write_json(tmp_path / "no.json", REPORT)


def test_the_report_or_its_summary_is_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = {k: v for k, v in REPORT.items() if k != "bundle_path"}
    out = write_report(tmp_path / "a" / "r.json", plain)
    assert out == tmp_path / "a" / "r.json"
    assert capsys.readouterr().out == json.dumps(plain, indent=2) + "\n"
    assert out.read_text() == json.dumps(plain, indent=2) + "\n"
    summary = {"benchmark": "example", "lost": 0}
    write_report(tmp_path / "b.json", REPORT, summary, default=str)
    assert capsys.readouterr().out == '{\n  "benchmark": "example",\n  "lost": 0\n}\n'
    assert json.loads((tmp_path / "b.json").read_text())["bundle_path"] == "/opt/models/cu-k"
    for nowhere in (None, ""):  # --json not given (bench/kafka.py, faults.py, valence.py)
        assert write_report(nowhere, plain, summary) is None
        assert capsys.readouterr().out == json.dumps(summary, indent=2) + "\n"
    assert sorted(p.name for p in tmp_path.rglob("*.json")) == ["b.json", "r.json"]
