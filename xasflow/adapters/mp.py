"""Materials Project XAS documents (emmet ``XASDoc``, as served by ``mp-api``) as records.

``MPRester().materials.xas.search(...)`` returns ``XASDoc`` objects (emmet-core
``emmet/core/xas.py``; ``SpectrumDoc`` base). Saved as JSON, the fields this module relies on:

* ``material_id`` (``"mp-149"``) and ``spectrum_id`` (``"mp-149-XANES-Si-K"``; older dumps
  may only carry ``xas_id`` or ``task_ids``, used as fall-backs),
* ``absorbing_element``, ``edge`` (``K``, ``L2``, ``L3``, ``L2,3``), ``spectrum_type``
  (``XANES``, ``EXAFS``, ``XAFS``) at top level, falling back to the same keys in ``spectrum``,
* ``spectrum``: a pymatgen ``XAS.as_dict()`` with ``x`` (energies, eV), ``y`` (mu),
  ``structure`` (pymatgen ``Structure.as_dict()``), ``absorbing_index`` (None for
  site-averaged spectra), ``absorbing_element`` (a symbol or an ``Element`` dict).
  ``x``/``y`` may be plain lists or monty's ``{"@module": "numpy", "data": [...]}`` form.

``XASDoc`` has no top-level ``structure``; one is used only if ``spectrum.structure`` is absent.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xasflow.adapters.feff import ReadIssue
from xasflow.spectra.core import Spectrum

#: Environment variable holding the Materials Project API key.
MP_API_KEY_ENV = "MP_API_KEY"


@dataclass(frozen=True, eq=False)
class MPXasRecord:
    """One Materials Project XAS spectrum with its structure (pymatgen ``as_dict`` form)."""

    material_id: str
    spectrum_id: str
    element: str
    edge: str
    spectrum_type: str
    absorbing_index: int | None
    energy: np.ndarray
    mu: np.ndarray
    structure: dict

    def to_spectrum(self) -> Spectrum:
        """This record as a :class:`Spectrum`; ids, type and absorbing index go to meta."""
        return Spectrum(
            energy=self.energy,
            mu=self.mu,
            element=self.element,
            edge=self.edge,
            meta={
                "name": self.spectrum_id,
                "material_id": self.material_id,
                "spectrum_id": self.spectrum_id,
                "spectrum_type": self.spectrum_type,
                "absorbing_index": self.absorbing_index,
                "source": "materialsproject",
            },
        )


class _BadDoc(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _symbol(value: Any) -> str | None:
    """An element symbol from ``"Cu"``, ``{"element": "Cu", ...}`` (pymatgen) or None."""
    if isinstance(value, dict):
        value = value.get("element") or value.get("symbol")
    if isinstance(value, str) and value.strip():
        return value.strip().capitalize()
    return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):  # monty-serialised enum or id
        value = value.get("value") or value.get("string")
    text = str(value).strip()
    return text or None


def _array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, dict) and "data" in value:  # monty's numpy encoding
        value = value["data"]
    if not isinstance(value, list | tuple) or not value:
        raise _BadDoc("bad_spectrum", f"spectrum.{name} is missing or empty")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _BadDoc("bad_spectrum", f"spectrum.{name} is not a list of numbers") from None
    if arr.ndim != 1:
        raise _BadDoc("bad_spectrum", f"spectrum.{name} has shape {arr.shape}, expected 1-D")
    if not np.all(np.isfinite(arr)):
        raise _BadDoc("bad_spectrum", f"spectrum.{name} has NaN or infinite values")
    return arr


def _doc_id(doc: Any, index: int) -> str:
    if isinstance(doc, dict):
        for key in ("spectrum_id", "xas_id", "task_id", "material_id"):
            text = _text(doc.get(key))
            if text:
                return text
    return f"doc[{index}]"


def _record(doc: Any) -> MPXasRecord:
    """Turn one document into a record, or raise _BadDoc saying why not."""
    if not isinstance(doc, dict):
        raise _BadDoc("bad_doc", f"expected a JSON object, got {type(doc).__name__}")
    spectrum = doc.get("spectrum")
    if not isinstance(spectrum, dict):
        raise _BadDoc("missing_spectrum", "document has no spectrum")
    material_id = _text(doc.get("material_id"))
    if not material_id:
        raise _BadDoc("missing_field", "document has no material_id")
    task_ids = doc.get("task_ids") or doc.get("xas_ids") or []
    spectrum_id = (
        _text(doc.get("spectrum_id"))
        or _text(doc.get("xas_id"))
        or _text(doc.get("task_id"))
        or (_text(task_ids[0]) if isinstance(task_ids, list) and task_ids else None)
    )
    if not spectrum_id:
        raise _BadDoc("missing_field", "document has no spectrum_id, xas_id or task_id")
    element = _symbol(doc.get("absorbing_element")) or _symbol(spectrum.get("absorbing_element"))
    if not element:
        raise _BadDoc("missing_field", "no absorbing_element")
    edge = _text(doc.get("edge")) or _text(spectrum.get("edge")) or "K"
    kind = _text(doc.get("spectrum_type")) or _text(spectrum.get("spectrum_type")) or "XANES"
    energy = _array(spectrum.get("x"), "x")
    mu = _array(spectrum.get("y"), "y")
    if energy.shape != mu.shape:
        raise _BadDoc("bad_spectrum", f"x has {energy.size} points but y has {mu.size}")
    structure = spectrum.get("structure") or doc.get("structure")
    if not isinstance(structure, dict) or not structure.get("sites"):
        raise _BadDoc("missing_structure", "no structure with sites in spectrum or document")
    index = spectrum.get("absorbing_index")
    if index is not None:
        if isinstance(index, bool) or not isinstance(index, int | float) or index != int(index):
            raise _BadDoc("bad_spectrum", f"absorbing_index {index!r} is not an integer")
        index = int(index)
        if not 0 <= index < len(structure["sites"]):
            raise _BadDoc(
                "bad_spectrum",
                f"absorbing_index {index} outside the {len(structure['sites'])}-site structure",
            )
    energy.setflags(write=False)
    mu.setflags(write=False)
    return MPXasRecord(
        material_id=material_id,
        spectrum_id=spectrum_id,
        element=element,
        edge=edge.upper(),
        spectrum_type=kind.upper(),
        absorbing_index=index,
        energy=energy,
        mu=mu,
        structure=structure,
    )


def _docs_of(payload: Any, path: Path) -> list[Any]:
    if isinstance(payload, list):
        return payload
    if isinstance(payload, dict):
        for key in ("docs", "data"):
            if isinstance(payload.get(key), list):
                return payload[key]
    raise ValueError(f"{path}: expected a JSON list of XAS documents or {{'docs': [...]}}")


def read_mp_xas_json(
    path: str | Path,
    element: str | None = None,
    edge: str | None = "K",
    spectrum_type: str | None = "XANES",
) -> tuple[list[MPXasRecord], list[ReadIssue]]:
    """Read saved MP XAS documents; keep those matching element/edge/type (None: any).

    Documents that do not match the filters are skipped quietly; documents that cannot be
    read become ReadIssues (reasons: bad_doc, missing_spectrum, missing_field,
    missing_structure, bad_spectrum). Records are sorted by (material_id, spectrum_id).
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    want_element = element.strip().capitalize() if element else None
    want_edge = edge.strip().upper() if edge else None
    want_type = spectrum_type.strip().upper() if spectrum_type else None
    records: list[MPXasRecord] = []
    issues: list[ReadIssue] = []
    for i, doc in enumerate(_docs_of(payload, path)):
        try:
            record = _record(doc)
        except _BadDoc as exc:
            issues.append(ReadIssue(_doc_id(doc, i), exc.reason, exc.detail))
            continue
        if want_element and record.element != want_element:
            continue
        if want_edge and record.edge != want_edge:
            continue
        if want_type and record.spectrum_type != want_type:
            continue
        records.append(record)
    records.sort(key=lambda r: (r.material_id, r.spectrum_id))
    return records, issues


def _plain(obj: Any) -> Any:
    """Turn pydantic models, pymatgen objects, numpy values, enums and dates into JSON data."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, enum.Enum):
        return _plain(obj.value)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    if hasattr(obj, "model_dump"):
        return _plain(obj.model_dump())
    if hasattr(obj, "as_dict"):
        return _plain(obj.as_dict())
    return str(obj)


def _default_client(api_key: str) -> Any:
    try:
        from mp_api.client import MPRester
    except ImportError as exc:
        raise RuntimeError(
            "downloading from the Materials Project needs mp-api: pip install 'xasflow[mp]'"
        ) from exc
    return MPRester(api_key)


def fetch_mp_xas(
    element: str,
    out: Path,
    api_key: str | None = None,
    edge: str = "K",
    client_factory: Callable[[str | None], Any] | None = None,
    spectrum_type: str | None = "XANES",
) -> int:
    """Download MP XAS documents for one absorbing element and edge into a JSON file.

    Returns the number of documents written. ``client_factory(api_key)`` replaces
    ``mp_api.client.MPRester`` (tests pass a fake); the key comes from ``api_key`` or
    ``$MP_API_KEY`` and is never written to the file.
    """
    key = api_key or os.environ.get(MP_API_KEY_ENV) or None
    if client_factory is None:
        if not key:
            raise RuntimeError(
                f"no Materials Project API key: pass api_key or set {MP_API_KEY_ENV}"
            )
        client = _default_client(key)
    else:
        client = client_factory(key)
    symbol = element.strip().capitalize()
    query: dict[str, Any] = {"absorbing_element": symbol, "edge": edge}
    if spectrum_type:
        query["spectrum_type"] = spectrum_type
    if hasattr(client, "__enter__"):
        with client as mpr:
            docs = _search(mpr, query)
    else:
        docs = _search(client, query)
    plain = [_plain(doc) for doc in docs]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "query": query,
        "fetched_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "docs": plain,
    }
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    os.replace(tmp, out)
    return len(plain)


def _search(mpr: Any, query: dict[str, Any]) -> Iterable[Any]:
    """Call the XAS search on a client (``mpr.materials.xas`` on current mp-api, ``mpr.xas`` before)."""
    materials = getattr(mpr, "materials", None)
    rester = getattr(materials, "xas", None) if materials is not None else None
    if rester is None:
        rester = getattr(mpr, "xas", None)
    if rester is None:
        raise RuntimeError("the Materials Project client has no XAS endpoint (materials.xas)")
    return list(rester.search(**query))
