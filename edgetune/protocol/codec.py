"""The payload codec: deterministic safetensors bytes with an ``edgetune.*`` metadata header.

`encode_payload` writes standard safetensors (sorted header keys, tensors in name order, so the
same tensors give the same bytes); `parse_header` checks a header strictly without trusting any
declared size; `decode_payload` parses once and loads the tensors.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load

from edgetune.protocol.names import (
    META_FAMILY,
    META_KIND,
    META_PROTOCOL,
    META_ROUND,
    META_SPEC,
    PAYLOAD_FAMILY,
    PAYLOAD_GLOBAL,
    PROTOCOL_VERSION,
)
from edgetune.protocol.spec import AdapterSpec, ProtocolError

#: safetensors dtype tag -> (torch dtype, bytes per element). Only float types are allowed.
FLOAT_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}
#: Every dtype a payload may declare: the float types plus I8 (int8-compressed updates only).
WIRE_DTYPES: dict[str, tuple[torch.dtype, int]] = {**FLOAT_DTYPES, "I8": (torch.int8, 1)}
MAX_HEADER_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as declared in a safetensors header, before any data is touched."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Payload:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


_TAG_OF = {dt: tag for tag, (dt, _) in WIRE_DTYPES.items()}


def encode_payload(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Deterministic safetensors bytes of float ``tensors`` with ``metadata``.

    Same tensors and metadata give the same bytes (sorted header keys, tensors in name order),
    so a client's retry and the server's content-addressed blobs are byte-stable. The output
    is standard safetensors (any safetensors reader loads it).
    """
    meta = {META_PROTOCOL: str(PROTOCOL_VERSION), **{k: str(v) for k, v in metadata.items()}}
    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
    chunks, pos = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _TAG_OF:
            raise ProtocolError(
                "bad_dtype", f"tensor {name!r} has dtype {t.dtype}; only float and int8 travel"
            )
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _TAG_OF[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [pos, pos + len(raw)],
        }
        chunks.append(raw)
        pos += len(raw)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _parse_entry(name: str, info: Any, data_len: int) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ProtocolError("not_safetensors", f"header entry {name!r} is malformed")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in WIRE_DTYPES:
        raise ProtocolError(
            "bad_dtype", f"tensor {name!r} has dtype {dtype!r}; allowed: {list(WIRE_DTYPES)}"
        )
    ok_shape = isinstance(shape, list) and all(type(s) is int and 0 <= s < 1 << 40 for s in shape)
    ok_offsets = (
        isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
    )
    if not ok_shape or not ok_offsets:
        raise ProtocolError(
            "not_safetensors", f"header entry {name!r} has a malformed shape or offsets"
        )
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ProtocolError("bad_offsets", f"tensor {name!r} has offsets {offsets}")
    if end > data_len:
        raise ProtocolError(
            "truncated_payload",
            f"tensor {name!r} ends at byte {end} but the payload holds {data_len} data bytes",
        )
    if end - begin != _numel(tuple(shape)) * WIRE_DTYPES[dtype][1]:
        raise ProtocolError(
            "bad_offsets", f"tensor {name!r}: {end - begin} bytes do not fit shape {shape}"
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def parse_header(data: bytes) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    """Strictly parse a safetensors header without trusting any declared size.

    Raises ProtocolError with codes ``not_safetensors``, ``header_too_large``,
    ``truncated_payload``, ``bad_offsets``, ``bad_dtype``.
    """
    if len(data) < 8:
        raise ProtocolError(
            "not_safetensors", f"payload of {len(data)} bytes has no safetensors header"
        )
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise ProtocolError(
            "header_too_large", f"declared header size {n} exceeds {MAX_HEADER_BYTES}"
        )
    if n > len(data) - 8:
        raise ProtocolError(
            "truncated_payload", f"declared header size {n} exceeds payload size {len(data)}"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError("not_safetensors", f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("not_safetensors", "header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ProtocolError("not_safetensors", "__metadata__ must map strings to strings")
    data_len = len(data) - 8 - n
    entries = {name: _parse_entry(name, info, data_len) for name, info in header.items()}
    _check_contiguous(entries, data_len)
    return metadata, entries


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all distinct (a repeated key is ambiguous: refused)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        repeated = sorted({k for k, _ in pairs if sum(1 for q, _ in pairs if q == k) > 1})
        raise ProtocolError("not_safetensors", f"header repeats the keys {repeated[:5]}")
    return out


def _check_contiguous(entries: Mapping[str, TensorEntry], data_len: int) -> None:
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            raise ProtocolError(
                "bad_offsets", f"tensor {e.name!r} overlaps or leaves a gap at byte {pos}"
            )
        pos = e.end
    if pos != data_len:
        raise ProtocolError("bad_offsets", f"{data_len - pos} trailing bytes after the last tensor")


def decode_payload(data: bytes) -> Payload:
    """Parse and load a payload; the header is checked strictly before tensors are built."""
    metadata, _ = parse_header(data)
    try:
        tensors = _st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ProtocolError(
            "not_safetensors", f"safetensors could not load the payload: {exc}"
        ) from exc
    return Payload(tensors=tensors, metadata=dict(metadata))


def encode_model(
    tensors: Mapping[str, torch.Tensor], version: int, spec: AdapterSpec | None
) -> bytes:
    """A model as the server serves it: the global branch (``spec`` None) or a family's model
    (its spec in the header), produced by round ``version`` (0: the initial model)."""
    if spec is None:
        return encode_payload(tensors, {META_KIND: PAYLOAD_GLOBAL, META_ROUND: str(version)})
    meta = {META_KIND: PAYLOAD_FAMILY, META_ROUND: str(version)}
    meta |= {META_FAMILY: spec.family, META_SPEC: spec.to_json()}
    return encode_payload(tensors, meta)
