"""What the queueserver tests with and without a server share: a two-region recommendation,
its plan rows, and an analysis run that carries it as a ``recommendations`` row."""

from __future__ import annotations

import json
from typing import Any

from helpers import analysis_run_docs

REC = {
    "regions": [
        {
            "name": "pre-edge",
            "start": 8978.0,
            "stop": 8990.0,
            "step": 0.5,
            "dwell": 2.0,
            "reason": "importance 1.00, mostly for cn",
        },
        {
            "name": "beyond",
            "start": 9020.0,
            "stop": 9100.0,
            "step": 2.0,
            "dwell": 0.5,
            "reason": "importance 0.20",
        },
    ],
    "rescan": None,
    "stop_early": False,
    "e0": 8983.5,
    "uncertainty": 0.4,
    "bundle_id": "cu-k-test",
}
ROWS = [[8978.0, 8990.0, 0.5, 2.0], [9020.0, 9100.0, 2.0, 0.5]]


def advice_run_docs(
    stop_early: bool, raw_uid: str = "raw-1", exit_status: str = "success", rescan: str = ""
) -> list[tuple[str, dict[str, Any]]]:
    row = {
        "regions": json.dumps(REC["regions"]),
        "rescan": rescan,
        "stop_early": stop_early,
        "e0": 8983.5,
        "bundle_id": "cu-k-test",
    }
    return analysis_run_docs(
        [("primary", {"status": "ok"}), ("recommendations", row)],
        raw_uid,
        stop={"exit_status": exit_status},
    )
