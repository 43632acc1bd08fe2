#!/usr/bin/env python3
"""Exit 0 when the xasflow daemon's ``/health`` answers 200 (ready), else 1, saying why.

Used by the image's HEALTHCHECK (the Kubernetes probes read the open ``/livez`` and
``/readyz`` instead): the token comes from the
environment (``XASFLOW__HTTP__TOKEN``, as the daemon reads it), so it never appears on a
command line or in a manifest. Standard library only.

    xasflow-healthcheck [--url http://127.0.0.1:8620/health] [--wait SECONDS]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request


def check(url: str, token: str | None, timeout: float) -> str | None:
    """None when ``url`` answers 200, else the reason it is not healthy."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}" + (" (not ready)" if exc.code == 503 else "")
    except (OSError, ValueError) as exc:
        return f"no answer from {url}: {exc}"


def main(argv: list[str] | None = None) -> int:
    """Check once, or poll until healthy for up to ``--wait`` seconds."""
    port = os.environ.get("XASFLOW__HTTP__PORT", "8620")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=f"http://127.0.0.1:{port}/health")
    parser.add_argument("--timeout", type=float, default=4.0, help="per request, seconds")
    parser.add_argument("--wait", type=float, default=0.0, help="poll this long (seconds)")
    args = parser.parse_args(argv)
    token = os.environ.get("XASFLOW__HTTP__TOKEN") or None
    deadline = time.monotonic() + args.wait
    while True:
        reason = check(args.url, token, args.timeout)
        if reason is None:
            return 0
        if time.monotonic() >= deadline:
            print(f"xasflow unhealthy: {reason}", file=sys.stderr)
            return 1
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
