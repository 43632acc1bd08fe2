"""What the dashboard's tests share: a server-sent-events reader on a raw socket (HTTP/1.0,
so the body is the plain event stream, read with deadlines instead of sleeps), a GET that
returns error answers too, and the dashboard's update rate in the tests (``dash``, conftest)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEADLINE_S = 20.0
RATE_HZ = 5.0


class SSEClient:
    """A minimal server-sent-events reader on a raw socket (HTTP/1.0: no chunked framing)."""

    def __init__(self, base_url: str, path: str = "/events", headers: dict[str, str] | None = None):
        u = urllib.parse.urlsplit(base_url)
        host = "127.0.0.1" if u.hostname in ("0.0.0.0", "::") else u.hostname
        self.sock = socket.create_connection((host, u.port), timeout=DEADLINE_S)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(
            f"GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: text/event-stream\r\n{extra}\r\n".encode()
        )
        self.buffer = b""
        head = self._read_until(b"\r\n\r\n", time.monotonic() + DEADLINE_S)
        self.status = int(head.split(b" ", 2)[1])
        self.headers = head.decode("latin-1").lower()

    def _read_until(self, sep: bytes, deadline: float) -> bytes:
        while sep not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {sep!r} within the deadline")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("stream closed")
            self.buffer += chunk
        block, self.buffer = self.buffer.split(sep, 1)
        return block

    def next_event(self, deadline: float) -> tuple[str, Any]:
        """The next event's name and JSON data (comments and retry hints skipped)."""
        while True:
            block = self._read_until(b"\n\n", deadline).decode()
            fields: dict[str, str] = {}
            for line in block.split("\n"):
                if line and not line.startswith(":") and ":" in line:
                    key, value = line.split(":", 1)
                    fields[key] = value.removeprefix(" ")
            if "event" in fields:
                return fields["event"], json.loads(fields["data"])

    def next_state(self, deadline: float) -> dict[str, Any]:
        """The next ``state`` event's JSON (other events skipped)."""
        while True:
            event, data = self.next_event(deadline)
            if event == "state":
                return data  # type: ignore[no-any-return]

    def wait_for(self, predicate: Any, timeout: float = DEADLINE_S) -> tuple[dict[str, Any], int]:
        """The first state satisfying ``predicate``, and how many states were read for it."""
        deadline = time.monotonic() + timeout
        n = 0
        while True:
            state = self.next_state(deadline)
            n += 1
            if predicate(state):
                return state, n

    def close(self) -> None:
        self.sock.close()


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
