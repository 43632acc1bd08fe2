"""Bluesky 0MQ wire format: framing parity with bluesky, safe decoding, msgpack-numpy symmetry."""

from __future__ import annotations

import os
import pickle
import random
import shlex
from pathlib import Path
from typing import Any

import event_model
import msgpack
import msgpack_numpy
import numpy as np
import pytest
from document_helpers import assert_docs_equal

from xasflow.adapters.wire import (
    DECODE_ERROR_REASONS,
    DOCUMENT_NAMES,
    WireError,
    decode_body,
    decode_message,
    decode_msgpack,
    detect_format,
    encode_message,
    encode_msgpack,
    restricted_pickle_loads,
    split_message,
)


def make_run(n_events: int = 3, n_points: int = 400) -> list[tuple[str, dict[str, Any]]]:
    """A small XAS-like run (start, descriptor, events with spectra, stop) from event-model."""
    bundle = event_model.compose_run(metadata={"plan_name": "xas_scan", "element": "Cu"})
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={
            "energy": {"source": "sim", "dtype": "array", "shape": [n_points]},
            "i0": {"source": "sim", "dtype": "array", "shape": [n_points]},
            "it": {"source": "sim", "dtype": "number", "shape": []},
        },
    )
    docs: list[tuple[str, dict[str, Any]]] = [
        ("start", bundle.start_doc),
        ("descriptor", desc.descriptor_doc),
    ]
    energy = np.linspace(8800.0, 9500.0, n_points)
    for i in range(n_events):
        ev = desc.compose_event(
            data={"energy": energy, "i0": np.exp(-energy / 1e4) * (i + 1), "it": np.float64(i)},
            timestamps={"energy": 1.0, "i0": 1.0, "it": 1.0},
            seq_num=i + 1,
            validate=False,
        )
        docs.append(("event", ev))
    docs.append(("stop", bundle.compose_stop(exit_status="success")))
    return docs


SAMPLE_DOC: dict[str, Any] = {
    "uid": "abc",
    "time": 1.5,
    "seq_num": 3,
    "flags": [True, False, None],
    "tuple": (1, "two", 3.0),
    "data": {
        "mu": np.linspace(0.0, 1.0, 7),
        "counts": np.arange(12, dtype=np.int32).reshape(3, 4),
        "big_endian": np.arange(4, dtype=">f4"),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "strided": np.arange(10.0)[::3],
        "structured": np.zeros(2, dtype=[("x", "<f8"), ("y", "<i2", (2,))]),
        "flag": np.bool_(True),
        "f32": np.float32(2.5),
        "i64": np.int64(-7),
        "empty": np.zeros((0, 3)),
    },
}


# --------------------------------------------------------------------------- framing


class _CapturingSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, message: bytes) -> None:
        self.sent.append(message)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("prefix", [b"", b"beamline-8"])
def test_pickle_framing_is_byte_identical_to_bluesky_publisher(prefix: bytes) -> None:
    from bluesky.callbacks.zmq import Publisher

    pub = Publisher("tcp://127.0.0.1:9", prefix=prefix)  # never sends: socket swapped below
    real_socket, pub._socket = pub._socket, _CapturingSocket()
    try:
        for name, doc in make_run(n_events=2):
            pub(name, doc)
            assert pub._socket.sent[-1] == encode_message(name, doc, prefix=prefix)
    finally:
        pub._socket = real_socket
        pub.close()
    assert pub._socket.closed


def test_split_message_matches_remote_dispatcher_split() -> None:
    body = pickle.dumps({"a": b"x y z"})  # spaces inside the body must survive
    msg = b"pre event " + body
    assert split_message(msg) == (b"pre", "event", body)
    assert split_message([msg]) == (b"pre", "event", body)
    assert split_message([b"pre", b"event", body]) == (b"pre", "event", body)
    assert split_message(b" start " + body) == (b"", "start", body)


def test_prefix_semantics_follow_remote_dispatcher() -> None:
    msg = encode_message("start", {"uid": "u"}, prefix=b"alpha")
    assert decode_message(msg, None) == ("start", {"uid": "u"})
    assert decode_message(msg, b"") == ("start", {"uid": "u"})
    assert decode_message(msg, b"alpha") == ("start", {"uid": "u"})
    for other in (b"alphabet", b"alph", b"beta"):
        with pytest.raises(WireError) as info:
            decode_message(msg, other)
        assert info.value.reason == "wrong_prefix"


def test_encode_message_validates_inputs() -> None:
    with pytest.raises(ValueError, match="prefix"):
        encode_message("start", {}, prefix=b"a b")
    with pytest.raises(ValueError, match="unknown document"):
        encode_message("bulk_events", {})
    with pytest.raises(TypeError):
        encode_message("start", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fmt"):
        encode_message("start", {}, fmt="json")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_restricted_pickle_round_trip_all_protocols(protocol: int) -> None:
    out = restricted_pickle_loads(pickle.dumps(SAMPLE_DOC, protocol=protocol))
    expected = pickle.loads(pickle.dumps(SAMPLE_DOC, protocol=protocol))  # numpy's own result
    assert_docs_equal(out, expected)
    np.testing.assert_array_equal(out["data"]["mu"], SAMPLE_DOC["data"]["mu"])
    assert out["tuple"] == (1, "two", 3.0)
    assert all(a.flags.writeable for a in out["data"].values() if isinstance(a, np.ndarray))


def test_restricted_pickle_accepts_plain_python_extras() -> None:
    from collections import OrderedDict

    doc = {"od": OrderedDict(a=1), "s": {1, 2}, "fs": frozenset({3}), "c": 1 + 2j}
    doc |= {"ba": bytearray(b"xy"), "b": b"", "obj": np.array([1, "x", None], dtype=object)}
    for protocol in (2, 4, 5):
        out = restricted_pickle_loads(pickle.dumps(doc, protocol=protocol))
        assert out["od"] == OrderedDict(a=1) and isinstance(out["od"], OrderedDict)
        assert out["s"] == {1, 2} and out["fs"] == frozenset({3}) and out["c"] == 1 + 2j
        assert out["ba"] == bytearray(b"xy") and out["b"] == b""
        assert out["obj"].tolist() == [1, "x", None]


def test_msgpack_round_trip_keeps_arrays_and_scalars() -> None:
    out = decode_msgpack(encode_msgpack(SAMPLE_DOC))
    data = out["data"]
    for key in ("mu", "counts", "big_endian", "fortran", "strided", "structured", "empty"):
        assert_docs_equal(data[key], SAMPLE_DOC["data"][key], key)
        assert data[key].flags.writeable
    assert data["flag"] == np.bool_(True) and type(data["flag"]) is np.bool_
    assert data["f32"] == np.float32(2.5) and type(data["f32"]) is np.float32
    assert data["i64"] == -7 and type(data["i64"]) is np.int64
    assert out["tuple"] == [1, "two", 3.0]  # msgpack has no tuple type


def test_msgpack_is_symmetric_with_msgpack_numpy() -> None:
    theirs = decode_msgpack(msgpack_numpy.packb(SAMPLE_DOC))
    ours = msgpack_numpy.unpackb(encode_msgpack(SAMPLE_DOC))
    for decoded in (theirs, ours):
        for key, value in SAMPLE_DOC["data"].items():
            if isinstance(value, np.ndarray):
                assert_docs_equal(decoded["data"][key], value, key)
            else:
                assert decoded["data"][key] == value and type(decoded["data"][key]) is type(value)
    obj = {"o": np.array([1, "x"], dtype=object), "c": 3 - 4j}
    assert decode_msgpack(msgpack_numpy.packb(obj))["o"].tolist() == [1, "x"]
    assert decode_msgpack(encode_msgpack(obj))["c"] == 3 - 4j


@pytest.mark.parametrize("fmt", ["pickle", "msgpack"])
def test_event_model_run_round_trips(fmt: str) -> None:
    for name, doc in make_run():
        got_name, got = decode_message(encode_message(name, doc, prefix=b"bl", fmt=fmt), b"bl")
        assert got_name == name
        if fmt == "pickle":
            assert_docs_equal(got, doc)
        else:
            assert_docs_equal(got, msgpack_numpy.unpackb(msgpack_numpy.packb(doc)))
    assert {n for n, _ in make_run()} <= DOCUMENT_NAMES


def test_format_detection_is_unambiguous() -> None:
    for protocol in (2, 3, 4, 5):
        assert detect_format(pickle.dumps({"a": 1}, protocol=protocol)) == "pickle"
    for n_keys in range(0, 40):
        body = encode_msgpack({f"k{i}": i for i in range(n_keys)})
        assert detect_format(body) == "msgpack"
        assert decode_body(body) == {f"k{i}": i for i in range(n_keys)}


def test_formats_can_be_restricted() -> None:
    body = pickle.dumps({"a": 1})
    with pytest.raises(WireError) as info:
        decode_body(body, formats=("msgpack",))
    assert info.value.reason == "format_disabled"
    assert decode_body(encode_msgpack({"a": 1}), formats=("msgpack",)) == {"a": 1}


# --------------------------------------------------------------------------- hostile input


class _Shell:
    """Pickles to ``os.system(cmd)``: what an attacker would send to a pickle.loads consumer."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.cmd,))


class CustomThing:
    """An ordinary user class: not plain data, so refused too."""

    def __init__(self) -> None:
        self.x = 1


def _touch_payload(path: Path) -> bytes:
    return pickle.dumps({"uid": "evil", "data": _Shell(f"touch {shlex.quote(str(path))}")})


def test_os_system_pickle_is_rejected_and_not_executed(tmp_path: Path) -> None:
    # Positive control: the same payload really does run a command under pickle.loads.
    control = tmp_path / "control"
    pickle.loads(_touch_payload(control))
    assert control.exists()

    target = tmp_path / "pwned"
    with pytest.raises(WireError) as info:
        decode_message(b" event " + _touch_payload(target))
    assert info.value.reason == "forbidden_global"
    assert "system" in info.value.detail
    assert not target.exists()


def _object_array_payload(path: Path) -> bytes:
    """msgpack-numpy's object-array framing around a malicious pickle."""
    arr = {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1], b"data": _touch_payload(path)}
    return msgpack.packb({"uid": "x", "a": arr}, use_bin_type=True)


def test_msgpack_numpy_object_array_pickle_is_restricted(tmp_path: Path) -> None:
    # msgpack_numpy.decode runs pickle.loads on kind b'O' arrays; ours goes through the allow-list.
    control = tmp_path / "control"
    msgpack_numpy.unpackb(_object_array_payload(control))
    assert control.exists()

    target = tmp_path / "pwned"
    with pytest.raises(WireError) as info:
        decode_msgpack(_object_array_payload(target))
    assert info.value.reason == "forbidden_global"
    assert not target.exists()


@pytest.mark.parametrize(
    ("obj", "detail"),
    [
        (CustomThing(), "CustomThing"),
        (print, "print"),
        (eval, "eval"),
        (np.load, "load"),
        (Path("/etc/passwd"), "Path"),
    ],
)
def test_other_globals_are_forbidden(obj: Any, detail: str) -> None:
    with pytest.raises(WireError) as info:
        restricted_pickle_loads(pickle.dumps({"x": obj}))
    assert info.value.reason == "forbidden_global"
    assert detail in info.value.detail


@pytest.mark.parametrize(
    "payload",
    [
        # bytearray(2**30): would allocate 1 GiB through an allowed global.
        b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R.",
        # numpy.ndarray((2**40,)) called directly.
        b"\x80\x02cnumpy\nndarray\n\x8a\x06\x00\x00\x00\x00\x00\x01\x85\x85R.",
        # _reconstruct with a non-ndarray subtype.
        b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85C\x01b\x87R.",
        # _codecs.encode with a codec other than latin1.
        b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.",
        # persistent id.
        b"\x80\x02X\x01\x00\x00\x00aQ.",
    ],
)
def test_allowed_globals_cannot_be_misused(payload: bytes) -> None:
    with pytest.raises(WireError) as info:
        restricted_pickle_loads(payload)
    assert info.value.reason == "pickle_invalid"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        # The messages from bluesky PR #1449 (network scanners crashing live servers).
        (b" \x80abc ", "bad_name"),
        (b" start ", "empty_body"),
        (b" start abc", "msgpack_invalid"),
        (b"", "bad_framing"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "unknown_document"),
        (b" bulk_events " + pickle.dumps({}), "unknown_document"),
        (b" start " + pickle.dumps([1, 2]), "not_a_dict"),
        (b" start " + encode_msgpack([1, 2]), "not_a_dict"),
        (b" start \x80\x04garbage", "pickle_invalid"),
        (b" start " + msgpack.packb({"a": msgpack.ExtType(5, b"x")}), "msgpack_invalid"),
        (
            b" event "
            + msgpack.packb({"a": {b"nd": True, b"type": "<f8", b"shape": [3], b"data": b"x"}}),
            "bad_array",
        ),
        (
            b" event "
            + msgpack.packb({"a": {b"nd": True, b"type": "|O", b"shape": [1], b"data": b"x" * 8}}),
            "bad_array",
        ),
    ],
)
def test_malformed_messages_have_stable_reasons(message: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        decode_message(message)
    assert info.value.reason == reason
    assert reason in DECODE_ERROR_REASONS


def test_fuzzed_input_only_ever_raises_wire_error() -> None:
    rng = random.Random(1449)
    good = [encode_message(n, d, fmt=f) for n, d in make_run(2, 16) for f in ("pickle", "msgpack")]
    outcomes: dict[str, int] = {}
    for i in range(3000):
        if i % 2:
            msg = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
        else:  # flip a few bytes of a valid message: exercises deep decoder paths
            msg = bytearray(rng.choice(good))
            for _ in range(rng.randint(1, 4)):
                msg[rng.randrange(len(msg))] = rng.getrandbits(8)
            msg = bytes(msg)
        try:
            name, doc = decode_message(msg)
        except WireError as exc:
            outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
        else:
            assert name in DOCUMENT_NAMES and isinstance(doc, dict)
            outcomes["ok"] = outcomes.get("ok", 0) + 1
    assert set(outcomes) - {"ok"} <= set(DECODE_ERROR_REASONS)
    assert outcomes.get("bad_framing", 0) > 0 and outcomes.get("pickle_invalid", 0) > 0
