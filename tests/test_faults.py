"""The fault bench's short catalogue against the real proxy and daemon (bench/faults.py --quick).

Every fault must be survived, every bad input counted, and nothing tampered served or lost
unseen: the same figures the full bench reports. (SIGKILL and the restart it needs, hence
``published_not_stored``, run only in the full bench.) The daemon runs with its defaults, so
publish-after-store is on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

pytest.importorskip("bluesky.callbacks.zmq")
pytest.importorskip("zmq")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import faults


@pytest.mark.timeout(300)
def test_quick_fault_catalogue(tiny_cu_bundle: Path) -> None:
    result = faults.run_bench(argparse.Namespace(quick=True, models=tiny_cu_bundle))
    failed = [f for f in result["faults"] if not f["survived"]]
    assert failed == []
    assert result["faults_tried"] == result["faults_survived"] >= 12
    names = {f["fault"] for f in result["faults"]}
    assert {"tamper_manifest", "tamper_manifest_same_id", "symlink_dir", "bundle_removal"} <= names
    assert result["tampered_bundles_served"] == 0
    assert result["bad_inputs_tried"] == result["bad_inputs_counted"] > 30
    assert result["silent_losses"] == 0
    # SIGSTOP longer than the run timeout, with publish-after-store on (the default): every
    # spectrum has its row on the bus or is counted missing in the stop; nothing went out
    # unstored because the process stood still
    stall = next(f for f in result["faults"] if f["fault"] == "sigstop_under_load")
    assert stall["ok"] + stall["rejected"] + stall["lost"] == 160 and stall["silent"] == 0
    assert stall["no_stop"] == 0 and stall["lost"] == stall["counted_missing"]
    assert stall["after_store"] is True and stall["released_unstored"] == 0
    removal = next(f for f in result["faults"] if f["fault"] == "bundle_removal")
    assert removal["no_model"] == 0 and removal["ok"] == 15
    refused = {f["fault"]: f["reason"] for f in result["faults"] if "reason" in f}
    assert refused == {
        "tamper_bytes": "file_mismatch",
        "tamper_manifest": "digest_mismatch",
        "tamper_digest": "digest_mismatch",
        "symlink_file": "symlink",
        "symlink_dir": "symlink",
        "tamper_manifest_same_id": "bundle_id_reused",
    }
    # every refusal reached /metrics by reason (xasflow_model_refused_total{reason})
    assert result["refusals_by_reason"] == {
        "bundle_id_reused": 1,
        "digest_mismatch": 2,
        "file_mismatch": 1,
        "symlink": 2,
    }
    assert result["max_rss_growth_mb"] is not None
    # analysis.prep_process: its child killed, then stopped past the answer timeout, under
    # load: the processing thread took over (fallbacks), nothing was lost, a new child came
    prep = {f["fault"]: f for f in result["faults"] if f["fault"].startswith("prep_process")}
    assert set(prep) == {"prep_process_sigkill", "prep_process_sigstop"}
    for fault in prep.values():  # fallbacks and restarts: each round's own
        assert fault["lost"] == 0 and fault["ok"] == 1600 and fault["fallbacks"] >= 1
        assert fault["restarts"] >= 1 and fault["pid_after"] != fault["pid_before"]
