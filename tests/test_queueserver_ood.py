"""The queueserver submitter at its edge: no plan queued from advice that follows an
out-of-domain answer (it failed on aca8a8c, found by a read-only review; the IOC's cases of
that review are in test_epics_ioc)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import analysis_run_docs

from xasflow.adapters.queueserver import QueueServerConfig, QueueServerSubmitter

# --------------------------------------------------------------------------- queueserver


class _FakeApi:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
        self.items.append(item)
        return {"success": True, "msg": "", "item": dict(item, item_uid=f"u{len(self.items)}")}

    def close(self) -> None:
        pass


_REGIONS = [
    {"name": "edge", "start": 8978.0, "stop": 8990.0, "step": 0.5, "dwell": 2.0, "reason": "x"}
]


@pytest.mark.parametrize("submit_on", ["run_end", "rescan"])
def test_no_plan_is_queued_for_an_out_of_domain_answer(submit_on: str) -> None:
    """The recommender advises after every analysed spectrum, out-of-domain ones included
    (only stop_early is withheld for them), and the submitter looks at nothing but the
    ``recommendations`` stream: a run whose every answer the bundle flags "not to be trusted"
    gets its advice queued as a plan (run_end), and each of its rescans (rescan). Neither the
    queueserver module nor docs/architecture.md says out-of-domain advice is submitted."""
    fake = _FakeApi()
    cfg = QueueServerConfig(
        enabled=True, zmq_public_key="x" * 40, min_interval_s=0.0, submit_on=submit_on
    )
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake)
    ood_row = {
        "status": "ok",
        "cn": 4,
        "flags": "out_of_domain",
        "out_of_domain": True,
        "ood_score": 9.0,
    }
    advice = {
        "regions": json.dumps(_REGIONS),
        "rescan": json.dumps(dict(_REGIONS[0], dwell=6.0)),
        "stop_early": False,  # never True for an out-of-domain spectrum
        "stop_reason": "out_of_domain: the answer is not to be trusted, keep measuring",
        "e0": 8983.5,
        "bundle_id": "cu-k-test",
        "out_of_domain": True,  # the pipeline marks advice that follows such an answer
    }
    docs = analysis_run_docs(
        [("primary", ood_row), ("recommendations", advice)],
        "raw-ood",
        stop={"exit_status": "success", "n_analysed": 1, "n_out_of_domain": 1},
    )
    try:
        for name, doc in docs:
            sub(name, doc)
        assert sub.join(5.0)
        assert fake.items == [], (
            f"{len(fake.items)} plan(s) queued for a run whose only answer is out of domain: "
            f"{[i['kwargs']['md']['xasflow']['kind'] for i in fake.items]}"
        )
        assert sub.stats["skipped_out_of_domain"] == 1
    finally:
        sub.close()
