"""The strict base every daemon configuration section shares, and the checks of values
several sections hold (bus addresses and prefixes, directories, hosts)."""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = [
    "BOOL_WORDS",
    "Section",
    "check_address",
    "check_directory",
    "check_prefix",
    "is_loopback",
]


class Section(BaseModel):
    """Common settings: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


def check_address(value: str) -> str:
    """A 0MQ endpoint, ``tcp://`` when none is given; a TCP one must end in a port, which 0MQ
    would otherwise refuse only at start ("Invalid argument"), or connect to for ever (99999)."""
    value = value.strip()
    if not value:
        raise ValueError("address must not be empty")
    address = value if "://" in value else f"tcp://{value}"
    if address.startswith("tcp://"):
        host, colon, port = address.removeprefix("tcp://").rpartition(":")
        if not (colon and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError("a TCP address ends in a port 1-65535: give host:port")
        if ":" in host and not host.endswith("]"):  # tcp://::1 read as host "::" port 1
            raise ValueError("an IPv6 host goes in brackets: tcp://[::1]:5577")
    return address


#: The words pydantic reads as a boolean.
BOOL_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "t", "f", "y", "n", "1", "0"})


def check_directory(value: Any) -> Any:
    """A directory setting: an empty one (``directory: ""``, an env override left blank) was
    read as ".", the working directory of whoever started the daemon."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("an empty path would be the working directory: give one (or omit it)")
    return value


def check_prefix(value: str) -> str:
    """A bus prefix: one ASCII word, as bluesky frames it (``prefix name document``)."""
    if " " in value:
        raise ValueError("prefix must not contain spaces (bluesky frames are space-separated)")
    try:
        value.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("prefix must be ASCII") from None
    return value


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
