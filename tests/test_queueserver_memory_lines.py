"""The queueserver memory's lines as the next daemon reads them: what the file says of a
plan is the same whether it was appended line by line or rewritten at twice the limit."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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


#: The release before the memory knew lost replies and plans given up for good.
OLD_RELEASE = "d944cd9"


def _old_memory(tmp_path: Path) -> Any:
    """The previous release's ``queueserver_memory`` module (from git), as a rolled-back
    daemon reads the file."""
    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run(
        ["git", "-C", str(root), "show", f"{OLD_RELEASE}:xasflow/adapters/queueserver_memory.py"],
        capture_output=True,
        text=True,
    )
    if shown.returncode != 0:
        pytest.skip(f"release {OLD_RELEASE} not in this checkout: {shown.stderr.strip()}")
    source = tmp_path / "old_queueserver_memory.py"
    source.write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location("old_queueserver_memory", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_a_plan_given_up_for_good_stays_so_for_the_previous_release(tmp_path: Path) -> None:
    """A plan given up (its reply lost), then given up for good by the next daemon: the
    previous release, rolled back onto the same file, skips the ``abandoned`` line it does
    not know. Before, it kept the earlier ``gave_up`` line and revived the plan (re-adding
    one an operator may have removed) and a replay sent it. Now the plan's key is written
    before the ``abandoned`` line (read by the old release as queued: never sent again), in
    the file appended to as in one rewritten; the new release still reads it abandoned."""
    old = _old_memory(tmp_path)
    for limit in (4096, 3):  # appended; rewritten at 6 lines
        path = tmp_path / str(limit) / SUBMITTED_FILE
        with SubmittedRuns(path, limit=limit) as memory:
            memory.sending(K)
            memory.lost_reply(K)
            memory.give_up(K, {"regions": []}, False)
        with SubmittedRuns(path, limit=limit) as memory:
            assert memory.lost_before(K)
            memory.abandon(K, "lost_reply")
            memory.took()
            memory.took()
        assert ('"sending"' in path.read_text()) == (limit == 4096)  # rewritten, or not
        with SubmittedRuns(path) as new:
            assert K in new and new.keys() == [] and new.given_up() == []
            assert not new.lost_before(K)
        with old.SubmittedRuns(path) as rolled_back:
            assert [g.key for g in rolled_back.revive(10, 900.0, 10)] == [], limit
            assert K in rolled_back, f"limit {limit}: a replay would send it"


def test_plans_given_up_without_end_keep_the_memory_and_its_file_bounded(tmp_path: Path) -> None:
    """A submission queue full for hours gives up (and remembers) a plan per run: the memory
    keeps the newest ``limit // 2`` of them, and its file, rewritten at twice the limit,
    never grows past that, however many come; the next daemon reads the newest back."""
    path = tmp_path / SUBMITTED_FILE
    limit = 6
    with SubmittedRuns(path, limit=limit) as memory:
        for i in range(200):
            memory.give_up((f"raw-{i}", "run_end"), {"regions": []}, False)
            assert len(path.read_text().splitlines()) < 2 * limit
        newest = [(f"raw-{i}", "run_end") for i in range(197, 200)]
        assert [plan.key for plan in memory.given_up()] == newest
    with SubmittedRuns(path, limit=limit) as memory:
        assert [plan.key for plan in memory.given_up()] == newest


def test_a_file_full_of_plans_given_up_for_good_is_not_rewritten_at_each_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory holds its ``limit`` keys, ``limit // 2`` plans given up and ``limit // 2``
    given up for good (two lines each): what a rewrite writes is past twice the limit, the
    rewrite's trigger. Before, every later line rewrote (and fsync'd) the whole file anew;
    now the next rewrite waits for the file to double: one rewrite per as many lines as it
    wrote (21 here), so 100 lines cost at most six rewrites, not 100. All
    that is kept reads back the same, for this release and (given up for good as queued,
    never sent again) for the previous one."""
    old = _old_memory(tmp_path)
    rewrites = [0]
    rewrite = SubmittedRuns._rewrite

    def counted(self: SubmittedRuns, path: Path) -> None:
        rewrites[0] += 1
        rewrite(self, path)

    monkeypatch.setattr(SubmittedRuns, "_rewrite", counted)
    limit, path = 8, tmp_path / SUBMITTED_FILE
    queued = [(f"raw-{i}", "run_end") for i in range(limit)]
    given_up = [(f"gave-{i}", "run_end") for i in range(limit // 2)]
    lost = [(f"lost-{i}", "run_end") for i in range(limit // 2)]
    with SubmittedRuns(path, limit=limit) as memory:
        for key in queued:
            memory.add(key)
        for key in given_up:
            memory.give_up(key, {"regions": []}, False)
        for key in lost:
            memory.abandon(key, "replays")
        rewrites[0] = 0
        for _ in range(100):
            memory.took()
        assert rewrites[0] <= 6, f"{rewrites[0]} rewrites for 100 lines"
        assert len(path.read_text().splitlines()) < 2 * 21
    with SubmittedRuns(path, limit=limit) as memory:
        assert memory.keys() == queued
        assert [plan.key for plan in memory.given_up()] == given_up
        assert all(key in memory for key in lost) and memory.slot_age() is not None
    with old.SubmittedRuns(path, limit=limit) as rolled_back:
        assert [g.key for g in rolled_back.revive(10, 900.0, 10)] == given_up
        assert all(key in rolled_back for key in lost)


def test_a_plan_given_up_for_good_takes_no_queued_plan_out_of_the_memory(tmp_path: Path) -> None:
    """The memory holds ``limit`` keys when a plan is given up for good. Its two lines (its
    key, for the previous release, then ``abandoned``) are read as abandoned; before, the
    reader held the key as queued first and, past ``limit``, forgot the oldest queued plan,
    which a replay of its run then queued again (the server's queue and history aside)."""
    path, limit = tmp_path / SUBMITTED_FILE, 4
    queued, lost = [(f"queued-{i}", "run_end") for i in range(limit)], ("lost", "run_end")
    with SubmittedRuns(path, limit=limit) as memory:
        for key in queued:
            memory.add(key)
        memory.abandon(lost, "replays")
        assert memory.keys() == queued
    with SubmittedRuns(path, limit=limit) as memory:
        assert memory.keys() == queued and lost in memory


def test_a_plan_given_up_after_its_key_was_trimmed_is_read_back_given_up(tmp_path: Path) -> None:
    """``limit: 4``: raw-1's plan is queued, four newer ones push its key out of the held
    ones (its line stays in the file), then a replay of raw-1 is given up. The next daemon
    reads raw-1 given up, to try again: the key line before the give-up is stale (a plan
    held as queued is never given up), not a reason to skip the give-up."""
    path = tmp_path / SUBMITTED_FILE
    with SubmittedRuns(path, limit=4) as memory:
        memory.add(K)
        for i in range(4):
            memory.add((f"raw-{i + 2}", "run_end"))
        assert K not in memory
        memory.give_up(K, {"regions": []}, False)
        assert [entry.key for entry in memory.given_up()] == [K]
    with SubmittedRuns(path, limit=4) as nxt:
        assert [entry.key for entry in nxt.given_up()] == [K], path.read_text()
        assert K not in nxt
        assert [entry.key for entry in nxt.revive(2, 900.0, 10)] == [K]


def test_the_memory_file_is_rewritten_by_twice_its_worst_kept_size(tmp_path: Path) -> None:
    """What the memory keeps at most, for ``limit``: ``limit`` keys, ``limit // 2`` plans
    given up, two lines for each of ``limit`` given up for good, and the slot: 29 lines for
    8 (14,337 for the default 4,096). Full of those, the file grows to twice that, 58 lines
    (28,674), then is rewritten to what is kept: bounded, amortised (the bound in the
    module's docstring and the README)."""
    path = tmp_path / SUBMITTED_FILE
    with SubmittedRuns(path, limit=8) as memory:
        for i in range(8):
            memory.abandon((f"lost-{i}", "run_end"), "replays")
            memory.add((f"raw-{i}", "run_end"))
        for i in range(4):
            memory.give_up((f"given-{i}", "run_end"), {"regions": []}, False)
        most = 0
        for _ in range(200):
            memory.took()
            most = max(most, len(path.read_text().splitlines()))
    kept = 8 + 8 // 2 + 2 * 8 + 1
    assert kept == 29 and most == 2 * kept - 1
    assert len(path.read_text().splitlines()) <= 2 * kept
