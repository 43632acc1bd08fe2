"""Materials Project XAS documents: reading saved JSON and fetching through a fake client."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xasflow.adapters.mp import MPXasRecord, fetch_mp_xas, read_mp_xas_json

FIXTURE = Path(__file__).parent / "fixtures" / "mp_xas_docs.json"


def fixture_docs() -> list[dict[str, Any]]:
    return json.loads(FIXTURE.read_text())["docs"]


def expected_mu(energy: np.ndarray, e0: float) -> np.ndarray:
    """The synthetic spectrum make_mp_fixture.py writes."""
    step = 0.5 + np.arctan((energy - e0) / 1.5) / np.pi
    return np.round(step + 0.6 * np.exp(-(((energy - e0 - 8.0) / 4.0) ** 2)), 6)


def test_fixture_cu_records() -> None:
    records, issues = read_mp_xas_json(FIXTURE, element="Cu")
    assert [r.spectrum_id for r in records] == ["mp-990001-XANES-Cu-K-0", "mp-990004-XANES-Cu-K"]
    assert [(i.item, i.reason) for i in issues] == [("mp-990003-XANES-Cu-K", "missing_spectrum")]
    site, averaged = records
    assert (site.material_id, site.element, site.edge, site.spectrum_type) == (
        "mp-990001",
        "Cu",
        "K",
        "XANES",
    )
    assert site.absorbing_index == 0
    assert averaged.absorbing_index is None
    np.testing.assert_array_equal(site.energy, np.linspace(8960.0, 9040.0, 41))
    np.testing.assert_allclose(site.mu, expected_mu(site.energy, 8980.0), rtol=0, atol=1e-12)
    # numpy-encoded arrays ({"@module": "numpy", "data": [...]}) read the same way
    np.testing.assert_array_equal(averaged.energy, np.linspace(8961.0, 9041.0, 21))
    species = [s["species"][0]["element"] for s in site.structure["sites"]]
    assert species == ["Cu", "Cu", "Cu", "Cu", "O", "O"]
    assert species[site.absorbing_index] == site.element


def test_structure_round_trips_through_pymatgen() -> None:
    pymatgen = pytest.importorskip("pymatgen.core")
    record = read_mp_xas_json(FIXTURE, element="Cu")[0][0]
    structure = pymatgen.Structure.from_dict(record.structure)
    assert structure.composition.reduced_formula == "Cu2O"
    assert structure[record.absorbing_index].specie.symbol == "Cu"


def test_filters() -> None:
    everything, _ = read_mp_xas_json(FIXTURE, element=None)
    assert [r.element for r in everything] == ["Cu", "Fe", "Cu"]
    iron, issues = read_mp_xas_json(FIXTURE, element="fe")
    assert [r.material_id for r in iron] == ["mp-990002"]
    assert len(issues) == 1  # unreadable documents are reported whatever the filter
    assert read_mp_xas_json(FIXTURE, edge="L3")[0] == []
    assert read_mp_xas_json(FIXTURE, spectrum_type="EXAFS")[0] == []


def test_to_spectrum() -> None:
    record = read_mp_xas_json(FIXTURE, element="Cu")[0][0]
    spectrum = record.to_spectrum()
    assert (spectrum.element, spectrum.edge) == ("Cu", "K")
    np.testing.assert_array_equal(spectrum.mu, record.mu)
    assert spectrum.meta["material_id"] == "mp-990001"
    assert spectrum.meta["absorbing_index"] == 0
    assert spectrum.meta["spectrum_type"] == "XANES"


def test_bad_documents_become_issues(tmp_path: Path) -> None:
    good = fixture_docs()[0]
    no_id = {k: v for k, v in good.items() if k != "material_id"}
    short_y = json.loads(json.dumps(good))
    short_y["spectrum"]["y"] = short_y["spectrum"]["y"][:-1]
    text_x = json.loads(json.dumps(good))
    text_x["spectrum"]["x"] = ["a", "b"]
    bad_index = json.loads(json.dumps(good))
    bad_index["spectrum"]["absorbing_index"] = 17
    no_structure = json.loads(json.dumps(good))
    del no_structure["spectrum"]["structure"]
    path = tmp_path / "docs.json"
    docs = [good, "not a doc", no_id, short_y, text_x, bad_index, no_structure]
    path.write_text(json.dumps({"data": docs}))
    records, issues = read_mp_xas_json(path, element="Cu")
    assert len(records) == 1
    assert [(i.item, i.reason) for i in issues] == [
        ("doc[1]", "bad_doc"),
        ("mp-990001-XANES-Cu-K-0", "missing_field"),
        ("mp-990001-XANES-Cu-K-0", "bad_spectrum"),
        ("mp-990001-XANES-Cu-K-0", "bad_spectrum"),
        ("mp-990001-XANES-Cu-K-0", "bad_spectrum"),
        ("mp-990001-XANES-Cu-K-0", "missing_structure"),
    ]
    assert "x has 41 points but y has 40" in issues[2].detail
    assert "outside the 6-site structure" in issues[4].detail


def test_plain_list_and_fallback_ids(tmp_path: Path) -> None:
    doc = fixture_docs()[0]
    del doc["spectrum_id"]
    del doc["absorbing_element"]  # falls back to spectrum.absorbing_element (an Element dict)
    path = tmp_path / "list.json"
    path.write_text(json.dumps([doc]))
    (record,), issues = read_mp_xas_json(path)
    assert issues == []
    assert (record.spectrum_id, record.element) == ("mp-990001-task", "Cu")


def test_not_json_or_wrong_shape(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_mp_xas_json(bad)
    bad.write_text('{"results": []}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_mp_xas_json(bad)


class FakeDoc:
    """Stands in for an emmet XASDoc: a pydantic-like model with numpy arrays inside."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def model_dump(self) -> dict[str, Any]:
        out = json.loads(json.dumps(self.doc))
        out["spectrum"]["x"] = np.asarray(out["spectrum"]["x"])
        return out


class FakeXasRester:
    def __init__(self, docs: list[FakeDoc]) -> None:
        self.docs = docs
        self.calls: list[dict[str, Any]] = []

    def search(self, **query: Any) -> list[FakeDoc]:
        self.calls.append(query)
        return [d for d in self.docs if d.doc["absorbing_element"] == query["absorbing_element"]]


class FakeClient:
    def __init__(self, api_key: str | None, docs: list[FakeDoc]) -> None:
        self.api_key = api_key
        self.materials = type("Materials", (), {})()
        self.materials.xas = FakeXasRester(docs)
        self.entered = self.exited = False

    def __enter__(self) -> FakeClient:
        self.entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.exited = True


def test_fetch_with_fake_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_API_KEY", "secret-key-123")
    docs = [FakeDoc(d) for d in fixture_docs() if d["spectrum"] is not None]
    clients: list[FakeClient] = []

    def factory(key: str | None) -> FakeClient:
        clients.append(FakeClient(key, docs))
        return clients[-1]

    out = tmp_path / "mp" / "cu.json"
    assert fetch_mp_xas("cu", out, client_factory=factory) == 2
    (client,) = clients
    assert client.api_key == "secret-key-123"
    assert client.entered and client.exited
    assert client.materials.xas.calls == [
        {"absorbing_element": "Cu", "edge": "K", "spectrum_type": "XANES"}
    ]
    assert "secret-key-123" not in out.read_text()
    records, issues = read_mp_xas_json(out, element="Cu")
    assert issues == []
    assert [r.material_id for r in records] == ["mp-990001", "mp-990004"]
    np.testing.assert_array_equal(records[0].energy, np.linspace(8960.0, 9040.0, 41))


def test_fetch_needs_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MP_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="MP_API_KEY"):
        fetch_mp_xas("Cu", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_fetch_without_mp_api_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mp_api", None)
    monkeypatch.setitem(sys.modules, "mp_api.client", None)
    with pytest.raises(RuntimeError, match=r"xasflow\[mp\]"):
        fetch_mp_xas("Cu", tmp_path / "x.json", api_key="k")


def test_record_is_immutable() -> None:
    record: MPXasRecord = read_mp_xas_json(FIXTURE, element="Cu")[0][0]
    with pytest.raises(ValueError):
        record.mu[0] = 5.0
