"""Bluesky 0MQ wire format: framing, safe decoding (restricted pickle, msgpack+numpy), encoding.

Framing (bluesky 1.15.1 ``bluesky/callbacks/zmq.py``, unchanged since the 2018 prefix rework):
``Publisher.__call__`` sends ONE frame ``b" ".join([prefix, name.encode(), serializer(doc)])``
with ``serializer=pickle.dumps`` by default; ``RemoteDispatcher`` splits it with
``message.split(b" ", 2)`` and, when its prefix is non-empty, keeps only an exact prefix match.
With an empty prefix the frame starts with ``b" "``.

Bodies are auto-detected per message: a pickle stream of protocol 2..5 starts ``0x80 <proto>``;
anything else is tried as msgpack. That is unambiguous for documents because a msgpack map
starts with ``0x80 | n`` (n keys) and only the empty map is exactly ``b"\\x80"``.

Pickle bodies go through a restricted unpickler: only plain containers, scalars and numpy
arrays/scalars/dtypes can be built; any other global is refused (``forbidden_global``) before
it is imported or called. msgpack bodies use msgpack-numpy's conventions for arrays
(``{b"nd": True, b"type", b"kind", b"shape", b"data"}``) decoded by our own hook, because
``msgpack_numpy.decode`` calls ``pickle.loads`` on object arrays.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgpack
import numpy as np

try:  # numpy >= 2 (and the forward-compat stub in 1.26)
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover - numpy 1.x without numpy._core
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]

__all__ = [
    "DECODE_ERROR_REASONS",
    "DOCUMENT_NAMES",
    "FORMATS",
    "WireError",
    "decode_body",
    "decode_message",
    "decode_msgpack",
    "detect_format",
    "encode_message",
    "encode_msgpack",
    "restricted_pickle_loads",
    "split_message",
]

#: event-model document names accepted on the wire (bluesky's legacy bulk_* names are not).
DOCUMENT_NAMES: frozenset[str] = frozenset(
    {
        "start",
        "descriptor",
        "event",
        "event_page",
        "stop",
        "resource",
        "datum",
        "datum_page",
        "stream_resource",
        "stream_datum",
    }
)

#: Body serialisations this module reads and writes.
FORMATS: tuple[str, ...] = ("pickle", "msgpack")

#: Every ``WireError.reason`` that decoding can produce (stable names, used as metric labels).
DECODE_ERROR_REASONS: tuple[str, ...] = (
    "bad_framing",  # not ``prefix SP name SP body``
    "bad_name",  # name frame is not ASCII
    "wrong_prefix",  # prefix differs from the one we filter on
    "unknown_document",  # name is not an event-model document name
    "empty_body",  # nothing after the second space
    "format_disabled",  # body format not in the allowed formats
    "forbidden_global",  # pickle referenced a global outside the allow-list
    "pickle_invalid",  # malformed pickle, or an allowed global misused
    "msgpack_invalid",  # malformed msgpack, or an unsupported extension
    "bad_array",  # msgpack-numpy array/scalar that cannot be rebuilt safely
    "not_a_dict",  # body decoded to something other than a dict
)

_PICKLE_PROTOCOLS = frozenset({2, 3, 4, 5})


class WireError(ValueError):
    """A message that cannot be turned into ``(name, doc)``; ``reason`` is a stable metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- framing


def split_message(payload: bytes | Sequence[bytes]) -> tuple[bytes, str, bytes]:
    """Split one bluesky 0MQ message into ``(prefix, name, body)`` without decoding the body.

    A multipart message is joined with ``b" "`` first (bluesky sends one frame; a 3-frame
    ``[prefix, name, body]`` sender is accepted too, but 0MQ topic filtering then only sees
    the first frame).
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        frames = [bytes(f) for f in payload]
        payload = frames[0] if len(frames) == 1 else b" ".join(frames)
    parts = bytes(payload).split(b" ", 2)
    if len(parts) != 3:
        raise WireError("bad_framing", f"expected 'prefix name body', got {len(parts)} part(s)")
    prefix, raw_name, body = parts
    try:
        name = raw_name.decode("ascii")
    except UnicodeDecodeError:
        raise WireError("bad_name", f"name is not ASCII: {raw_name[:40]!r}") from None
    return prefix, name, body


def detect_format(body: bytes) -> str:
    """Return ``"pickle"`` for a protocol 2..5 pickle header, else ``"msgpack"``."""
    if len(body) >= 2 and body[0] == 0x80 and body[1] in _PICKLE_PROTOCOLS:
        return "pickle"
    return "msgpack"


def decode_body(body: bytes, formats: Iterable[str] = FORMATS) -> dict[str, Any]:
    """Decode one document body (format auto-detected) into a dict, or raise ``WireError``."""
    if not body:
        raise WireError("empty_body")
    fmt = detect_format(body)
    if fmt not in formats:
        raise WireError("format_disabled", f"{fmt} bodies are not accepted")
    if fmt == "pickle":
        doc = restricted_pickle_loads(body)
    else:
        doc = decode_msgpack(body, allow_pickle="pickle" in formats)
    if not isinstance(doc, dict):
        raise WireError("not_a_dict", f"body decoded to {type(doc).__name__}")
    return doc


def decode_message(
    payload: bytes | Sequence[bytes],
    prefix: bytes | None = None,
    *,
    formats: Iterable[str] = FORMATS,
) -> tuple[str, dict[str, Any]]:
    """Decode a bluesky 0MQ message into ``(name, doc)``; raise ``WireError`` on anything else.

    ``prefix`` empty or None accepts any prefix (as ``RemoteDispatcher`` does); otherwise the
    message prefix must match it exactly.
    """
    msg_prefix, name, body = split_message(payload)
    if prefix and msg_prefix != prefix:
        raise WireError("wrong_prefix", f"{msg_prefix[:40]!r} != {prefix!r}")
    if name not in DOCUMENT_NAMES:
        raise WireError("unknown_document", repr(name[:40]))
    return name, decode_body(body, formats)


# --------------------------------------------------------------------------- restricted pickle


class _NdarrayToken:
    """Stands in for ``numpy.ndarray`` in pickles: usable only as ``_reconstruct``'s subtype."""

    __slots__ = ()


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy pickles always call _reconstruct(ndarray, (0,), b'b') and then __setstate__.
    if not isinstance(subtype, _NdarrayToken) or tuple(shape) != (0,):
        raise WireError("pickle_invalid", "unexpected numpy _reconstruct arguments")
    out: np.ndarray = getattr(_np_multiarray, "_reconstruct")(np.ndarray, (0,), dtype)  # noqa: B009
    return out


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    arr: np.ndarray = getattr(_np_numeric, "_frombuffer")(buf, dtype, shape, order)  # noqa: B009
    return arr if arr.flags.writeable else arr.copy()


def _safe_bytes(*args: Any) -> bytes:
    # protocol 2 pickles b'' as bytes(); refuse bytes(n), which would allocate n bytes.
    if args and isinstance(args[0], int):
        raise WireError("pickle_invalid", "bytes(int) is not allowed")
    return bytes(*args)


def _safe_bytearray(*args: Any) -> bytearray:
    if args and isinstance(args[0], int):
        raise WireError("pickle_invalid", "bytearray(int) is not allowed")
    return bytearray(*args)


def _latin1_encode(obj: Any, encoding: str = "latin1") -> bytes:
    # protocol 2 pickles bytes as _codecs.encode(str, 'latin1'); allow exactly that.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise WireError("pickle_invalid", "only _codecs.encode(str, 'latin1') is allowed")
    return obj.encode("latin1")


def _fresh(fn: Callable[..., Any]) -> Callable[[], Callable[..., Any]]:
    """Factory giving a new wrapper per lookup, so a pickle BUILD cannot mutate shared functions."""

    def factory() -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            return fn(*args)

        return wrapper

    return factory


def _const(obj: Any) -> Callable[[], Any]:
    return lambda: obj


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {}
for _mod in ("builtins", "__builtin__"):
    _ALLOWED_GLOBALS[(_mod, "set")] = _const(set)
    _ALLOWED_GLOBALS[(_mod, "frozenset")] = _const(frozenset)
    _ALLOWED_GLOBALS[(_mod, "complex")] = _const(complex)
    _ALLOWED_GLOBALS[(_mod, "bytes")] = _fresh(_safe_bytes)
    _ALLOWED_GLOBALS[(_mod, "bytearray")] = _fresh(_safe_bytearray)
_ALLOWED_GLOBALS[("collections", "OrderedDict")] = _const(OrderedDict)
_ALLOWED_GLOBALS[("_codecs", "encode")] = _fresh(_latin1_encode)
_ALLOWED_GLOBALS[("numpy", "dtype")] = _const(np.dtype)
_ALLOWED_GLOBALS[("numpy", "ndarray")] = _NdarrayToken
for _core in ("numpy._core", "numpy.core"):
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _fresh(_safe_reconstruct)
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "scalar")] = _const(_np_multiarray.scalar)
    _ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _fresh(_safe_frombuffer)
del _mod, _core


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals come only from the allow-list; nothing is imported."""

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise WireError("forbidden_global", f"{module[:80]}.{name[:80]}")
        return factory()

    def persistent_load(self, pid: Any) -> Any:
        raise WireError("pickle_invalid", "persistent ids are not allowed")


def restricted_pickle_loads(data: bytes) -> Any:
    """Unpickle plain data and numpy arrays only; raise ``WireError`` for anything else."""
    try:
        out = _RestrictedUnpickler(io.BytesIO(data)).load()
    except WireError:
        raise
    except Exception as exc:  # malformed streams raise many types; all mean "not a document"
        raise WireError("pickle_invalid", f"{type(exc).__name__}: {str(exc)[:200]}") from None
    _check_arrays(out)
    return out


#: Array kinds a pickled document may carry: booleans, integers, floats, complex, bytes,
#: text, Python objects (themselves unpickled under the same restrictions) and records of
#: these (structured dtypes, their fields checked alike).
_ARRAY_KINDS = frozenset("biufcSUOV")


def _check_dtype(dt: np.dtype, depth: int = 0) -> None:
    """Refuse a dtype a pickle's BUILD could have forged: ``dtype.__setstate__`` sets its
    flags, and an object field numpy believes holds none reads pointers from the message's
    bytes (a segfault). A dtype must equal, flags and size included, the same dtype built
    afresh from its description, and so must each field's; raw void and other kinds (dates,
    times) are refused."""
    if depth > 32 or dt.kind not in _ARRAY_KINDS or (dt.kind == "V" and dt.fields is None):
        raise WireError("bad_array", f"arrays of dtype {str(dt)[:80]} are not accepted")
    try:
        fresh = np.dtype(dt.descr) if dt.fields is not None else np.dtype(dt.str)
    except Exception as exc:
        raise WireError("bad_array", f"dtype {str(dt)[:80]}: {exc}") from None
    if fresh != dt or fresh.flags != dt.flags or fresh.itemsize != dt.itemsize:
        raise WireError("bad_array", f"dtype {str(dt)[:80]} with forged flags or size")
    for field in (dt.fields or {}).values():
        _check_dtype(field[0].base, depth + 1)


def _check_arrays(obj: Any, depth: int = 0) -> None:
    """:func:`_check_dtype` of every numpy array and scalar in an unpickled document."""
    if depth > _MAX_DEPTH:
        raise WireError("pickle_invalid", "document nested too deeply")
    if isinstance(obj, np.ndarray | np.generic):
        _check_dtype(obj.dtype)
        if obj.dtype.kind == "O":
            for item in np.asarray(obj).flat:
                _check_arrays(item, depth + 1)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_arrays(key, depth + 1)
            _check_arrays(value, depth + 1)
    elif isinstance(obj, list | tuple | set | frozenset):
        for item in obj:
            _check_arrays(item, depth + 1)


#: Deeper than any document (msgpack's own limit is about 1,000).
_MAX_DEPTH = 200


# --------------------------------------------------------------------------- msgpack + numpy


def _descr_to_dtype(descr: Any) -> np.dtype:
    """Rebuild a dtype from msgpack-numpy's ``type`` field, refusing object dtypes."""
    if isinstance(descr, bytes):
        descr = descr.decode("ascii")
    if isinstance(descr, list):
        fields = []
        for field in descr:
            if not isinstance(field, list) or len(field) < 2:
                raise WireError("bad_array", "malformed structured dtype")
            fname = field[0].decode("ascii") if isinstance(field[0], bytes) else field[0]
            fields.append((fname, _descr_to_dtype(field[1]), *(tuple(s) for s in field[2:])))
        dtype = np.dtype(fields)
    elif isinstance(descr, str):
        dtype = np.dtype(descr)
    else:
        raise WireError("bad_array", f"dtype descr of type {type(descr).__name__}")
    if dtype.hasobject:
        raise WireError("bad_array", "object dtypes are not allowed in raw array data")
    return dtype


def _msgpack_object_hook(obj: dict[Any, Any], allow_pickle: bool = True) -> Any:
    if b"nd" in obj:
        try:
            if obj[b"nd"] is True:
                if obj.get(b"kind") == b"O":  # msgpack-numpy pickles object arrays
                    if not allow_pickle:
                        raise WireError(
                            "format_disabled", "an object array is a pickle; pickle is off"
                        )
                    arr = restricted_pickle_loads(obj[b"data"])
                    if not isinstance(arr, np.ndarray):
                        raise WireError("bad_array", "object array payload is not an array")
                    return arr
                dtype = _descr_to_dtype(obj[b"type"])
                shape = tuple(int(s) for s in obj[b"shape"])
                arr = np.frombuffer(obj[b"data"], dtype=dtype).reshape(shape)
                return arr.copy()  # writable and independent of the message buffer
            dtype = _descr_to_dtype(obj[b"type"])
            data = obj[b"data"]
            if len(data) != dtype.itemsize:
                raise WireError("bad_array", "scalar data length does not match dtype")
            return np.frombuffer(data, dtype=dtype)[0]
        except WireError:
            raise
        except Exception as exc:
            raise WireError("bad_array", f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if obj.get(b"complex") is True and isinstance(obj.get(b"data"), str | bytes):
        data = obj[b"data"]
        try:
            return complex(data.decode("ascii") if isinstance(data, bytes) else data)
        except ValueError as exc:
            raise WireError("bad_array", f"bad complex literal: {exc}") from None
    return obj


def _no_pickle_hook(obj: dict[Any, Any]) -> Any:
    return _msgpack_object_hook(obj, allow_pickle=False)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError("msgpack_invalid", f"extension type {code} is not supported")


def decode_msgpack(data: bytes, allow_pickle: bool = True) -> Any:
    """Decode msgpack with msgpack-numpy array/scalar conventions, never touching full pickle
    (object arrays, which msgpack-numpy pickles, go through the restricted unpickler, or are
    refused when ``allow_pickle`` is False)."""
    hook = _msgpack_object_hook if allow_pickle else _no_pickle_hook
    try:
        return msgpack.unpackb(data, raw=False, object_hook=hook, ext_hook=_refuse_ext)
    except WireError:
        raise
    except Exception as exc:
        raise WireError("msgpack_invalid", f"{type(exc).__name__}: {str(exc)[:200]}") from None


def _msgpack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            return {
                b"nd": True,
                b"type": obj.dtype.descr,
                b"kind": b"O",
                b"shape": list(obj.shape),
                b"data": pickle.dumps(obj, protocol=4),
            }
        structured = obj.dtype.kind == "V"
        return {
            b"nd": True,
            b"type": obj.dtype.descr if structured else obj.dtype.str,
            b"kind": b"V" if structured else b"",
            b"shape": list(obj.shape),
            b"data": obj.tobytes(),
        }
    if isinstance(obj, np.bool_ | np.number):
        return {b"nd": False, b"type": obj.dtype.str, b"data": obj.tobytes()}
    if isinstance(obj, complex):
        return {b"complex": True, b"data": repr(obj)}
    if isinstance(obj, np.generic):  # str_, bytes_, datetime64, ...: plain Python value
        return obj.item()
    if isinstance(obj, set | frozenset):
        return list(obj)
    raise TypeError(f"cannot msgpack-encode {type(obj).__name__}")


def encode_msgpack(doc: Any) -> bytes:
    """Encode with msgpack-numpy conventions (readable by ``msgpack_numpy`` and ``decode_msgpack``)."""
    return msgpack.packb(doc, default=_msgpack_default, use_bin_type=True)


# --------------------------------------------------------------------------- encoding


def encode_message(
    name: str, doc: dict[str, Any], prefix: bytes = b"", fmt: str = "pickle"
) -> bytes:
    """Frame a document exactly as ``bluesky.callbacks.zmq.Publisher`` does.

    ``fmt="pickle"`` (default) is byte-identical to the stock Publisher, so an unmodified
    ``RemoteDispatcher`` reads it; ``fmt="msgpack"`` needs a msgpack(-numpy) deserializer.
    """
    if not isinstance(prefix, bytes) or b" " in prefix:
        raise ValueError(f"prefix must be bytes without b' ', got {prefix!r}")
    if name not in DOCUMENT_NAMES:
        raise ValueError(f"unknown document name {name!r}")
    if not isinstance(doc, dict):
        raise TypeError(f"doc must be a dict, not {type(doc).__name__}")
    if fmt == "pickle":
        body = pickle.dumps(doc)
    elif fmt == "msgpack":
        body = encode_msgpack(doc)
    else:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    return b" ".join([prefix, name.encode("ascii"), body])
