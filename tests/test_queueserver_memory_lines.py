"""The queueserver memory's lines as the next daemon reads them: what the file says of a
plan is the same whether it was appended line by line or rewritten at twice the limit."""

from __future__ import annotations

from pathlib import Path

from xasflow.adapters.queueserver_memory import SUBMITTED_FILE, SubmittedRuns

K = ("raw-1", "run_end")


def test_a_refused_retry_after_a_lost_reply_settles_it_in_a_rewritten_file(
    tmp_path: Path,
) -> None:
    """Try 1 loses its reply, try 2 (which found the plan in neither queue nor history) is
    refused, the plan is given up, and the file is rewritten (``limit: 2``: at 4 lines).
    The next daemon reads it given up, not lost: a replay tries it again rather than
    abandoning it, as it does when the same lines were appended."""
    for limit in (2, 4096):  # rewritten at the give-up, and appended
        path = tmp_path / str(limit) / SUBMITTED_FILE
        with SubmittedRuns(path, limit=limit) as memory:
            memory.sending(K)
            memory.lost_reply(K)
            memory.sending(K)
            memory.failed(K)
            memory.give_up(K, {"regions": []}, False)
        assert ('"sending"' in path.read_text()) == (limit == 4096)  # rewritten, or not
        with SubmittedRuns(path) as nxt:
            assert not nxt.lost_before(K), f"limit {limit}: {path.read_text()}"
            assert [entry.key for entry in nxt.given_up()] == [K]
            assert K not in nxt


def test_a_retry_in_flight_after_a_lost_reply_stays_in_doubt_in_a_rewritten_file(
    tmp_path: Path,
) -> None:
    """Try 1 loses its reply; try 2 is with the server when the file is rewritten (the
    server took it: the rate's slot, at 4 lines with ``limit: 2``) and the daemon dies
    before its outcome. The next daemon holds the plan in doubt (as queued: never sent
    again), as it does when the lines were appended, not as a lost reply."""
    for limit in (2, 4096):
        path = tmp_path / str(limit) / SUBMITTED_FILE
        with SubmittedRuns(path, limit=limit) as memory:
            memory.sending(K)
            memory.lost_reply(K)
            memory.sending(K)
            memory.took()
        with SubmittedRuns(path) as nxt:
            assert K in nxt, f"limit {limit}: {path.read_text()}"
            assert not nxt.lost_before(K)
