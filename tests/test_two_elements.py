"""One daemon serving two elements at once: each scan goes to the bundle of its edge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from helpers import CU_K, Harness, LoopbackProxy, daemon_config, fly_scan, publish, transmission
from synthetic_feff import K_EDGES

from xasflow.models.bundle import read_manifest


def test_cu_and_ni_scans_are_routed_to_their_bundles_and_fe_is_refused(
    tiny_cu_bundle: Path, tiny_ni_bundle: Path, proxy: LoopbackProxy, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    for bundle in (tiny_cu_bundle, tiny_ni_bundle):
        shutil.copytree(bundle, models / bundle.name)
    ids = {
        el: read_manifest(b).bundle_id for el, b in (("Cu", tiny_cu_bundle), ("Ni", tiny_ni_bundle))
    }
    assert ids["Cu"] != ids["Ni"]
    cfg = daemon_config(models, proxy, tmp_path / "store", run_timeout_s=1.5, timeout_check_s=0.1)
    h = Harness(cfg, proxy)
    try:
        serving = {(b["element"], b["edge"]) for b in h.daemon.view.models()}
        assert {("Cu", "K"), ("Ni", "K")} <= serving
        ni_k = K_EDGES["Ni"]
        cu_e = np.linspace(CU_K - 150, CU_K + 400, 700)
        ni_e = np.linspace(ni_k - 150, ni_k + 400, 700)
        fe_e = np.linspace(7000.0, 7400.0, 300)
        scans = {
            "Cu": fly_scan(cu_e, [transmission(cu_e, seed=s) for s in (1, 2)]),
            # no element in the start document: inferred from the edge position
            "Ni": fly_scan(
                ni_e,
                [transmission(ni_e, seed=s, edge=ni_k) for s in (3, 4)],
                {"element": None, "edge": None},
            ),
            "Fe": fly_scan(fe_e, [transmission(fe_e)], {"element": "Fe"}),
        }
        for _, docs in scans.values():
            publish(h.pub, docs)
        runs = h.results.wait([uid for uid, _ in scans.values()])
    finally:
        h.close()
    for element in ("Cu", "Ni"):
        events = runs[scans[element][0]]["events"]
        assert [e["status"] for e in events] == ["ok", "ok"], events
        assert {(e["element"], e["edge"], e["bundle_id"]) for e in events} == {
            (element, "K", ids[element])
        }
        assert all(e["cn"] in (2, 4, 6) for e in events)
    fe = runs[scans["Fe"][0]]["events"][0]
    assert (fe["status"], fe["reason"]) == ("rejected", "no_model")
    assert "Fe K" in fe["detail"] and "Cu K" in fe["detail"] and "Ni K" in fe["detail"]
    assert json.loads(json.dumps(runs[scans["Ni"][0]]["stop"]))["exit_status"] == "success"
