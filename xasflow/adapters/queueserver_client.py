"""Talking to the RE Manager for the queueserver submitter: the client, its error, and whether
the server already holds a plan.

:func:`make_api` builds the bluesky-queueserver-api client for the configured transport and
credential; :func:`on_server` asks the server's queue and history for the item xasflow
queued for a submission key; :func:`may_have_reached` tells a timeout that may follow a plan
the server took (a lost reply) from one of a request that never reached it.
:mod:`xasflow.adapters.queueserver` re-exports :class:`QueueServerError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xasflow.adapters.queueserver_plan import QueueServerConfig, item_key, secret

__all__ = ["QueueServerError", "make_api", "may_have_reached", "on_server"]


class QueueServerError(RuntimeError):
    """The queueserver refused a request or could not be reached."""


def on_server(api: Any, key: tuple[str, str]) -> bool:
    """Whether the queueserver's queue (its running item included) or history holds an
    item xasflow queued for ``key`` (:func:`~xasflow.adapters.queueserver_plan.item_key`).

    The memory of queued runs dies with the process, and Kafka redelivers after a restart
    what was not committed: the server's own record is what outlives the daemon. A reply
    that is no success raises (nothing is queued while it cannot be checked); a client
    without ``queue_get``/``history_get`` (a test double) is not asked.
    """
    items: list[Any] = []
    for name in ("queue_get", "history_get"):
        get = getattr(api, name, None)
        if get is None:
            return False
        reply = get(reload=True)
        if not isinstance(reply, Mapping) or reply.get("success") is False:
            msg = reply.get("msg") if isinstance(reply, Mapping) else reply
            raise QueueServerError(f"queueserver {name} failed: {msg}")
        items.extend(reply.get("items") or [])
        if reply.get("running_item"):
            items.append(reply["running_item"])
    return any(item_key(item) == key for item in items)


def may_have_reached(exc: BaseException) -> bool:
    """Whether the request that raised ``exc`` may have reached the server although no reply
    came: a timeout (the client's ``RequestTimeoutError`` is a ``TimeoutError``) other than
    one that never sent it. Over HTTP the client raises it ``from`` httpx's timeout: a
    ``ConnectTimeout`` or ``PoolTimeout`` (no connection to send on) never reached the
    server, a ``ReadTimeout`` or ``WriteTimeout`` may have. Over 0MQ a ``zmq.Again`` in the
    chain is a message the socket did not take; a receive timeout may follow a request the
    server took (a REQ socket queues the message for a server not up yet, so that one
    cannot be told apart: taken as maybe reached)."""
    if not isinstance(exc, TimeoutError):
        return False
    unsent = _unsent_errors()
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, unsent):
            return False
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return True


def _unsent_errors() -> tuple[type[BaseException], ...]:
    """The client library's errors of a request that was never sent (those installed)."""
    import zmq

    errors: list[type[BaseException]] = [zmq.Again]
    try:
        import httpx
    except ImportError:  # the 0MQ transport only
        return tuple(errors)
    return (*errors, httpx.ConnectTimeout, httpx.PoolTimeout)


def make_api(config: QueueServerConfig) -> Any:
    """The bluesky-queueserver-api client for the configured transport and credential."""
    try:
        if config.transport == "zmq":
            from bluesky_queueserver_api.zmq import REManagerAPI
        else:
            from bluesky_queueserver_api.http import REManagerAPI
    except ImportError as exc:
        raise QueueServerError(
            "bluesky-queueserver-api is not installed (pip install 'xasflow[queueserver]')"
        ) from exc
    if config.transport == "zmq":
        return REManagerAPI(
            zmq_control_addr=config.zmq_control_addr,
            zmq_info_addr=config.zmq_info_addr,
            zmq_public_key=secret(config.zmq_public_key),
            timeout_recv=config.timeout_s,
            timeout_send=config.timeout_s,
        )
    api = REManagerAPI(http_server_uri=config.http_server_uri, timeout=config.timeout_s)
    if config.api_key is not None:
        api.set_authorization_key(api_key=secret(config.api_key))
    else:
        api.set_authorization_key(token=secret(config.token))
    return api
