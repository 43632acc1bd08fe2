"""systemd's service notification protocol (``sd_notify``) without libsystemd.

Under a unit with ``Type=notify`` systemd passes a datagram socket in ``$NOTIFY_SOCKET``; the
daemon sends ``READY=1`` once it analyses spectra (so ``systemctl start`` returns then, and
units ordered after it start then) and ``STOPPING=1`` when it begins its clean shutdown.
Outside systemd the variable is unset and nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["NOTIFY_SOCKET", "sd_notify"]

logger = logging.getLogger(__name__)

#: The environment variable systemd names the notification socket in.
NOTIFY_SOCKET = "NOTIFY_SOCKET"


def sd_notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``"READY=1"``, ``"STOPPING=1"``, ``"STATUS=..."``, newline-separated)
    to systemd; False when not run by systemd or the socket refuses (logged, never raised)."""
    address = (os.environ if env is None else env).get(NOTIFY_SOCKET, "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        logger.warning("cannot notify systemd at %s: %s", address.lstrip("\0"), exc)
        return False
    return True
