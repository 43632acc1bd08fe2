"""Submit recommended scans to bluesky-queueserver as plans, only when an operator enables it.

Off by default (:class:`QueueServerConfig` ``enabled: false``). Enabled, it needs a
credential for the transport it uses, and refuses to start without one:

* ``transport: zmq`` (RE Manager's 0MQ control socket, ``bluesky_queueserver_api.zmq``):
  ``zmq_public_key``, the RE Manager's CURVE public key (its private half is
  ``QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER`` on the server; ``qserver-zmq-keys`` makes a pair).
  Without encryption anyone on the network could drive the queue, so a key is required.
* ``transport: http`` (bluesky-httpserver, ``bluesky_queueserver_api.http``): ``api_key``
  or ``token`` (sent as ``Authorization: ApiKey ...`` / ``Bearer ...``).

A recommended scan becomes the queue item ``plan_name`` (default :func:`xas_regions_scan`,
which a beamline profile imports from here) with kwargs ``detectors``, ``motor``,
``regions`` (``[[start, stop, step, dwell], ...]``, eV / s) and ``md`` (the raw run's uid,
the bundle, E0, why); the settings, the plan and the queue item are
:mod:`xasflow.adapters.queueserver_plan`'s (re-exported here), which refuses regions no
beamline should run and ``extra_kwargs`` that would replace the recommended scan; the client
is :mod:`xasflow.adapters.queueserver_client`'s.

:class:`QueueServerSubmitter` is also a document callback: it keeps each analysis run's
latest ``recommendations`` event and, when the run stops with ``exit_status: success``,
queues its advice (``submit_on: run_end``; nothing when the answer was already certain, nor
for a run aborted, failed or closed by a daemon's shutdown) or, with ``submit_on: rescan``,
only recommended rescans, each region once per run. Advice that follows an out-of-domain
answer, or is older than one (advice is throttled), is never queued
(``skipped_out_of_domain``): the sample is not what the bundle knows, and a plan would chase
a guess. A raw run gets its plan once, however often its analysis is replayed: this process
remembers what it queued, and before each submission the queueserver's queue and history are
asked for an item whose ``md.xasflow`` names the same raw run and submission (a Kafka
redelivery after a restart finds its plan there). With ``memory`` (the daemon's: a file
beside its store) what the server took is also remembered across restarts, so a plan an
operator removed from the queue, or one of a history cleared before the replay, is not
queued again; a run replayed by another daemon (a Kafka partition moved) has only the
server's record. A plan given up is remembered there apart (with what rebuilds it), and
:meth:`QueueServerSubmitter.retry_given_up` (the daemon calls it once it runs) tries the
previous daemon's again: in at most ``restart_retries`` restarts, if given up less than
``given_up_max_age_s`` ago, as retries (``revived``); one the server holds by then is not
queued twice. A plan given up is not held as queued: a later replay of its run, in this
process as after a restart, tries it again with its own ``retries`` (the server's queue and
history asked first), for at most ``given_up_replays`` replays (a call of
:meth:`~QueueServerSubmitter.submit` for its run counts as one); at the next it is given up
for good (``abandoned_replays``, logged and remembered).

Submissions run on a worker thread, so the daemon's publishing never waits on the network.
One rate holds whichever path queues a plan (:meth:`~QueueServerSubmitter.submit`, a first
try, a retry, a revived plan; :mod:`~xasflow.adapters.queueserver_pending`): at most one
plan per ``min_interval_s``, a slot held only by a plan the server took (with ``memory``,
across a restart too: the memory keeps when the server last took one). A run's new plan that
finds it held by another new plan is not sent (``skipped_rate``; one whose advice came while
a try was with the server, once that plan went in); a retry or a revived plan waits for its
slot instead, and so does a new plan that finds a retry holding the slot or retries waiting
for it (``waited_rate``; at most ``max_pending`` wait, beyond that it is given up and
remembered, ``gave_up_waiting_full``). A run's plan that finds ``max_pending`` plans already
queued is refused at enqueue and remembered as given up the same way
(``gave_up_queue_full``; the worker thread writes it to the memory, then counts it: the
daemon's processing thread, which calls ``enqueue``, never waits on disk): a replay of its
run or the next daemon tries it again, and so does this daemon, running on. The memory keeps the newest plans given up and rewrites its file
at twice its limit, or twice what its last rewrite kept if more
(:mod:`~xasflow.adapters.queueserver_memory`), so a queue full for hours bounds both.

A plan given up while the daemon runs on (``gave_up``, ``gave_up_queue_full``,
``gave_up_waiting_full``; not one close drops) is tried again by it, as a replay of its run
(``revived``), once ``given_up_retry_s`` (60 s; never sooner than the retry backoff's next
step, ``retry_backoff_s * 2**retries``) has passed since it was last given up and there is
room: no new run's plan queued and fewer than ``max_pending`` retries waiting (else it waits
``given_up_retry_s`` more). It waits for its slot in the rate like a retry, with its own
``retries``; a plan held as queued (a replay of its run or ``submit`` tries it) is left to
that path (one ``submit`` fails to send is retried, not dropped), and the server's
queue and history are asked first. Each round counts as one of its ``given_up_replays``
and it is given up again only once its tries, each after its backoff, failed, so a server
down for good costs a plan at most ``given_up_replays`` more rounds, no busy loop; past
them, or ``given_up_max_age_s`` after it was first given up, it is given up for good
(``abandoned_replays``, ``abandoned_expired``: logged at ERROR with its run, remembered),
as a replay of its run would. ``gave_up`` counts each round's give-up (a plan counts 1 +
``given_up_replays`` times at most) and ``revived`` each round. ``join`` does not wait for
these rounds.

A submission the server refused or could not take (in the background, or one ``submit``
sent while another path wanted its plan: ``submit`` raises all the same) is tried again
``retries`` times (``retried``), after ``retry_backoff_s``, then twice as long each time,
then given up (``gave_up``); each try asks the queue and history first, so a try whose
reply was lost after the server took the plan queues nothing twice. A lost reply (the
request timed out after the server answered those questions, in a way that may have reached
it, not while connecting: :func:`~xasflow.adapters.queueserver_client.may_have_reached`; ``lost_reply``)
is its own outcome in the memory: when a later daemon tries that plan (a replay, a revived
plan) and finds it in neither queue nor history, it does not add it
(``abandoned_lost_reply``, logged, given up for good): the server may have taken it and an
operator removed it since, and re-adding a plan an operator removed is worse than not adding
one the server never got. This daemon's own retries, seconds after the lost reply, still add
a plan found in neither. Retries wait beside the queue, never in front of it (a new run's
plan ready at the same time goes first), and close() does not wait for them: those still
waiting, the plans still queued when its timeout ends, and those that come while it lasts
(written by close, not by the processing thread that brought them), are dropped
(``dropped_closed``) and remembered as given up, so the next daemon tries them again like
any plan given up (within ``restart_retries`` and ``given_up_max_age_s``; one the server
took meanwhile is found there first).

Install with the ``queueserver`` extra (``bluesky-queueserver-api``; the server side needs
``bluesky-queueserver`` and Redis).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from xasflow.adapters.queueserver_client import (
    QueueServerError,
    make_api,
    may_have_reached,
    on_server,
)
from xasflow.adapters.queueserver_follow import RunFollower
from xasflow.adapters.queueserver_memory import SubmittedRuns
from xasflow.adapters.queueserver_pending import (
    WAKE,
    Deferred,
    GiveUps,
    Jobs,
    RateSlot,
    Retries,
    wake,
)
from xasflow.adapters.queueserver_plan import (
    MAX_PLAN_POINTS,
    RESERVED_KWARGS,
    QueueServerConfig,
    decode,
    item_key,
    plan_item,
    region_points,
    submission_key,
    xas_regions_scan,
)
from xasflow.adapters.queueserver_worker import LIMITED, Background
from xasflow.adapters.routing import SafeRouter, stream_factory

__all__ = [
    "MAX_PLAN_POINTS",
    "RESERVED_KWARGS",
    "QueueServerConfig",
    "QueueServerError",
    "QueueServerSubmitter",
    "plan_item",
    "region_points",
    "xas_regions_scan",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the client


class QueueServerSubmitter(Background):
    """Adds recommended scans to the queue (a no-op unless the config enables it); the
    background half (enqueue, the worker, retries) is :class:`~.queueserver_worker.Background`'s."""

    def __init__(
        self,
        config: QueueServerConfig | None = None,
        *,
        api_factory: Callable[[QueueServerConfig], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        memory: Path | None = None,
    ) -> None:
        """``api_factory`` builds the REManagerAPI (tests may inject one); default: the real one.
        ``memory``: the file the queued plans are remembered in across restarts
        (:mod:`~xasflow.adapters.queueserver_memory`; None: in this process only), held
        until :meth:`close`: ``MemoryInUseError`` when another daemon holds it."""
        self.config = config or QueueServerConfig()
        self._memory = SubmittedRuns(memory)
        self._api_factory = api_factory or make_api
        self._api: Any = None
        #: One rate, whichever path sends a plan, and across restarts (kept in the memory)
        self._rate = RateSlot(self.config, clock, self._memory.slot_age())
        self._queue = Jobs(self.config.max_pending)  # the wake-up marker takes no place
        self._retry = Retries()  # failed submissions to try again (join waits for them too)
        #: plans given up here, tried again once given_up_retry_s has passed (join does not wait)
        self._deferred = Deferred(clock, max(1, self._memory.limit // 2))
        self._give_ups = GiveUps()  # plans enqueue refused (full), for the worker to give up
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        #: Held while a request is with the server; ``close`` takes it once ``_closed`` is set,
        #: so nothing reaches the server after ``close`` returns (see :meth:`close`).
        self._send_lock = threading.Lock()
        self._closing = False  # close() has begun: nothing new is accepted
        self._closed = False  # close() has given up on what is queued: nothing more is sent
        self._router = SafeRouter(
            [stream_factory({}, on_run=lambda start: [RunFollower(self, start)])],
            "queueserver submitter",
        )
        self.stats: dict[str, int] = {
            "submitted": 0,
            "failed": 0,  # tries the server refused or could not take
            "lost_reply": 0,  # of those, tries whose reply never came (it may have taken them)
            "abandoned_lost_reply": 0,  # plans whose reply a previous daemon lost: not re-added
            "abandoned_replays": 0,  # plans given up, tried for given_up_replays replays already
            "abandoned_expired": 0,  # plans given up, too old to try again (given_up_max_age_s)
            "abandoned_restarts": 0,  # previous daemon's, tried in restart_retries restarts
            "abandoned_crowded": 0,  # previous daemon's, past the max_pending newest revived
            "abandoned_not_json": 0,  # plans JSON cannot write (numpy made plain): not sent
            "retried": 0,  # tries after a failed one
            "gave_up": 0,  # submissions that failed their last try
            "skipped_disabled": 0,
            "skipped_certain": 0,
            "skipped_rate": 0,
            "waited_rate": 0,  # new plans that waited for the rate slot (behind retries, or
            # wanted while a submit() the rate held back held them)
            "skipped_not_success": 0,
            "skipped_out_of_domain": 0,
            "skipped_repeat": 0,
            "refused_invalid": 0,  # background tries of plans no server takes (regions refused)
            "gave_up_queue_full": 0,  # new plans refused at enqueue (max_pending queued): remembered
            "gave_up_waiting_full": 0,  # new plans given up (max_pending wait): remembered
            "dropped_closed": 0,
            "revived": 0,  # plans given up, tried again (retry_given_up, or given_up_retry_s)
        }
        #: looks at the plans given up, to try them again, that failed (logged): no plan's
        #: outcome, so not in ``stats`` (its own metric and /health key)
        self.deferred_errors = 0
        #: (raw uid, what) held as queued ("run_end", or "rescan <region>"): whether settled
        #: (the newest settled kept, and every one still queued, under way or to retry)
        self._queued: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._submitting: dict[tuple[str, str], bool] = {}  # submit()'s: wanted meanwhile
        self.last_error: str = ""
        self.submitted: list[dict[str, Any]] = []  # server replies, newest last (at most 100)

    # ------------------------------------------------------------------ synchronous API

    def api(self) -> Any:
        """The REManagerAPI client (created on first use; QueueServerError once closed)."""
        if self._closed:
            raise QueueServerError("the submitter is closed: nothing more is submitted")
        if self._api is None:
            self._api = self._api_factory(self.config)
        return self._api

    def submit(
        self,
        recommendation: Mapping[str, Any],
        *,
        raw_uid: str | None = None,
        rescan_only: bool = False,
    ) -> dict[str, Any] | None:
        """Add one recommendation to the queue now; None when disabled, when a plan went in
        less than ``min_interval_s`` ago (``skipped_rate``: the one rate, see
        :mod:`~xasflow.adapters.queueserver_pending`), or when this raw run's plan was
        queued (``skipped_repeat``): held by this process (queued in the background, under
        way, waiting for a retry, or sent), remembered here (``memory``), or held by the
        queueserver's queue or history
        (:func:`~xasflow.adapters.queueserver_client.on_server`). While it is sent, the run's
        plan is held as queued: the background queue does not take it too (nor a retry of
        it given up); if this try fails, a plan another path wanted meanwhile is retried
        as a background plan is, this try its first (``retries`` more after the backoff,
        ``retried``, then ``gave_up``), and if the rate holds it back, that plan waits for
        its slot (``waited_rate``; not given up: nothing failed). A plan given up is
        tried again like a replay of its run, for at most ``given_up_replays`` calls, then
        given up for good (``abandoned_replays``; None). Raises QueueServerError."""
        key, job = None, None
        if self.enabled and raw_uid:
            job = (decode(recommendation), raw_uid, rescan_only)
            key = submission_key(raw_uid, job[0], rescan_only)
            with self._lock:  # looked at and taken at once: enqueue looks under it too
                if self._held(key):
                    self.stats["skipped_repeat"] += 1
                    return None
                self._hold(key)
                self._submitting[key] = False  # another path wanting it marks it (_held)
        reply: Any = None
        failed: QueueServerError | None = None  # refused, or not reached: not sent
        try:
            reply = self._send(recommendation, raw_uid, rescan_only)
        except QueueServerError as exc:
            failed = exc
            raise
        finally:
            if key is not None and job is not None:  # held and settled, let go, or handed on
                sent = isinstance(reply, dict)
                self._let_go(key, job, sent=sent, failed=failed, limited=reply is LIMITED)
        if reply is LIMITED:
            self.stats["skipped_rate"] += 1
            return None
        return reply

    def _send(
        self,
        recommendation: Mapping[str, Any],
        raw_uid: str | None,
        rescan_only: bool,
        tries: int = 0,
    ) -> Any:
        """One try of :meth:`submit` (``tries`` made before it): the server's reply, None, or
        ``LIMITED`` when the rate slot is held (nothing was sent). A given-up plan's first
        try (``tries`` 0, not held back by the rate) counts as a replay of its run, once for
        all its tries (a revived plan's are retries: no replay)."""
        if not self.enabled:
            self.stats["skipped_disabled"] += 1
            return None
        item = plan_item(self.config, recommendation, raw_uid=raw_uid, rescan_only=rescan_only)
        key = item_key(item) if raw_uid else None
        if key is not None and key in self._memory:
            self.stats["skipped_repeat"] += 1
            return None
        asked = False  # item_add was called: a timeout then is a lost reply
        try:
            with self._send_lock:  # close() waits for this request, and none starts after it
                api = self.api()
                if self._rate.limited():  # checked and taken under the lock: one rate
                    return LIMITED
                if not tries and key is not None and not self._replay(key):
                    return None  # given up for good (abandoned_replays)
                self.stats["retried"] += tries > 0
                if key is not None and on_server(api, key):
                    self.stats["skipped_repeat"] += 1  # queued by this daemon before a restart
                    self._memory.add(key)
                    return None
                if key is not None and self._memory.lost_before(key):  # maybe removed since
                    self._abandon(key, "lost_reply")
                    return None
                if key is not None:  # on disk before the server may take it (see memory)
                    self._memory.sending(key)
                asked = True
                reply = api.item_add(item, user=self.config.user, user_group=self.config.user_group)
                if not isinstance(reply, Mapping) or reply.get("success") is not False:
                    self._rate.take(retry=tries > 0)
                    self._memory.took()  # on disk: the next daemon keeps the rate
        except Exception as exc:
            lost = asked and may_have_reached(exc)  # a timeout: the server may have taken it
            if key is not None:  # the try it announced, if any, queued nothing (or is lost)
                (self._memory.lost_reply if lost else self._memory.failed)(key)
            if isinstance(exc, QueueServerError):
                raise
            self.stats["failed"] += 1
            self.stats["lost_reply"] += lost
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise QueueServerError(f"queueserver refused or unreachable: {exc}") from exc
        if isinstance(reply, Mapping) and reply.get("success") is False:
            self.stats["failed"] += 1
            self.last_error = str(reply.get("msg", ""))
            if key is not None:
                self._memory.failed(key)
            raise QueueServerError(f"queueserver refused the plan: {reply.get('msg')}")
        self.stats["submitted"] += 1
        if key is not None:  # on disk before the submission counts as done
            self._memory.add(key)
        self.submitted.append(dict(reply) if isinstance(reply, Mapping) else {"reply": reply})
        del self.submitted[:-100]
        return dict(reply) if isinstance(reply, Mapping) else {"reply": reply}

    def retry_given_up(self) -> int:
        """Try again, as retries, the plans the previous daemon gave up (remembered in
        ``memory``; see the module for which); the number scheduled. Once a process: the
        daemon calls it when it runs, not at construction, so a daemon that fails to start
        submits nothing. Once close has begun, none is: each is dropped (``dropped_closed``).
        One held as queued meanwhile (``submit`` is sending it, as a replay of its run) is
        left to that path: scheduled too, it would be tried twice, and the hold let go by a
        refused ``submit`` would let a replay queue it a third time."""
        if not self.enabled or self._closing:
            return 0
        cfg = self.config
        given_up = self._memory.revive(cfg.restart_retries, cfg.given_up_max_age_s, cfg.max_pending)
        for why, n in self._memory.forgotten.items():  # no daemon tries these: lost, counted
            self.stats[f"abandoned_{why}"] += n
        self._memory.forgotten.clear()
        with self._lock:  # close sets _closing under it: a retry pushed here is close's to drop
            plans = [plan for plan in given_up if not self._held(plan.key)]
            jobs = [(plan.rec, plan.key[0], plan.rescan_only) for plan in plans]
            closing = self._closing
            if not closing:
                for plan, job in zip(plans, jobs, strict=True):
                    self._hold(plan.key)
                    self._retry.push(job, 1)  # as a retry: it waits for its slot in the rate
                if jobs:
                    self._start_worker()
        if closing:  # close began since the look above
            for job in jobs:
                self._give_up(job, "dropped_closed")
            return 0
        self.stats["revived"] += len(plans)
        if plans:
            logger.info("trying again %d queueserver plans given up before a restart", len(plans))
            wake(self._queue)  # a worker already waiting for a run's plan looks at them now
        return len(plans)

    def close(self, timeout: float = 10.0) -> None:
        """Submit what is queued within ``timeout``, then stop: once close returns, nothing
        more reaches the queueserver.

        What is still queued at ``timeout``, and every retry still waiting, is dropped
        (``dropped_closed``) and remembered as given up, for the next daemon to try again
        (:meth:`retry_given_up`); a request already with the server is waited for (each ends
        within the client's ``timeout_s``), and no new client is made. Nothing is sent that
        comes once close has begun: a run's plan then is dropped and remembered the same way
        (the daemon closes the submitter last, so the last runs' plans may come meanwhile).
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:  # enqueue looks and offers under it: no plan or worker after this
            self._closing = True
            worker = self._worker
        if worker is not None and worker.is_alive():
            self._queue.put_nowait(None)  # no plan's place: never full
            worker.join(max(0.0, deadline - time.monotonic()))
        self._closed = True
        ended = self._send_lock.acquire(timeout=self.config.timeout_s + 1.0)
        if ended:
            self._send_lock.release()  # the request in flight, if any, has ended
        else:  # a client that ignores its own timeout: nothing can recall that request
            logger.error("a queueserver request is still in flight %.0f s after close", timeout)
        while True:  # what the worker did not reach
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job is not WAKE:
                self._give_up(job, "dropped_closed")
            self._queue.task_done()
        self._hand_over()  # plans refused at a full queue the worker did not give up yet
        with self._lock:  # retries still waiting (none pushed after: _closing is set)
            waiting = self._retry.clear()
        for job in waiting:
            self._give_up(job, "dropped_closed")
        self._queue.put_nowait(None)  # wakes a worker still waiting for a job
        if ended and worker is not None:  # nothing more to send: it records its last outcome
            worker.join(5.0)
        self._worker = None
        if self._api is not None:
            try:
                self._api.close()
            except Exception:
                logger.exception("closing the queueserver client failed")
            self._api = None
        self._memory.close()  # the next daemon may take the file

    def __enter__(self) -> QueueServerSubmitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ documents

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        """Follow analysis runs; submit their advice at the stop (or each rescan)."""
        if self.enabled:
            self._router(name, doc)
