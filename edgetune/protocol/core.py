"""The wire contract shared by the EdgeTune client runtime and the aggregation server.

This is the only module both sides import; it imports neither of them (only torch and
safetensors). It fixes:

* the **tensor naming convention** (``<group>.<...>``; groups ``global``, ``family``,
  ``private``, ``lora``),
* the **adapter spec** a client registers with, from which the server derives the exact set of
  tensor names, shapes and dtype an upload must contain,
* the **payload encoding**: safetensors bytes whose ``__metadata__`` header carries the
  ``edgetune.*`` keys below,
* what an upload *means*: tensors of the ``global`` group are **deltas** against the global
  branch the client downloaded for that round; tensors of the ``family`` and ``lora`` groups are
  **values** (the client's weights after local training). The server FedAvgs values and merges
  deltas (DESIGN.md section 4).

FedAdapter names (K anchors, L layers, rank r, width d = ``d_model``)::

    global.anchor{k}.C        [r, r]     k = 1..K   (identical across families)
    global.anchor{k}.q        [r]
    family.layer{l}.D         [d, r]     l = 0..L-1
    family.layer{l}.b_D       [r]
    family.layer{l}.C         [r, r]
    family.layer{l}.q         [r]
    family.layer{l}.U         [r, d]
    family.layer{l}.b_U       [d]
    family.layer{l}.alpha_logits [n_b(l)]     gate = "layer"
    family.layer{l}.W_alpha      [r, n_b(l)]  gate = "token"
    family.head.weight        [n_classes, d] (only when n_classes > 0)
    family.head.bias          [n_classes]
    private.layer{l}.C / .q   never uploaded; an upload naming one is rejected

``n_b(l)`` is 3 at an anchor layer (branch order: global, family, private) and 2 elsewhere
(family, private). Anchor k sits at layer ``anchor_layers(L, K)[k - 1]``, i.e.
``round_half_up(k * L / K) - 1``.

LoRA baselines (``kind = "lora"``)::

    lora.{module}.A           [rank, d_in]
    lora.{module}.B           [d_out, rank]
    family.head.weight / .bias as above

HTTP flow (all under ``/v1``; errors are JSON ``{"error": code, "detail": message, ...}``):

1. ``POST /v1/register`` with ``Authorization: Bearer <join token>`` and JSON
   ``{"spec": AdapterSpec.to_dict(), "tier": "nf4"}`` -> 201 ``{"client_id", "token", ...}``.
   The first spec of a family is pinned; a different one is 409 ``spec_mismatch``.
2. ``GET /v1/rounds/current`` (``Authorization: Bearer <client token>``) -> round number,
   state, deadline, ``accepting``, ``downloads`` and the ``upload`` path.
3. ``GET /v1/global`` and ``GET /v1/families/<family>`` -> safetensors (header
   ``X-EdgeTune-Version``: the round that produced it, 0 = initial). Load them, train.
   ``?version=N`` returns the model as it was after round N (evaluate every version, no race).
4. ``PUT /v1/rounds/<round>/updates/<client_id>`` with body
   ``encode_update(tensors, spec, round, num_samples, metrics)`` and
   ``Content-Type: application/octet-stream`` -> 201; an identical retry -> 200; a different
   second upload -> 409 ``duplicate_upload``; a closed/other round -> 409 ``round_closed`` with
   ``current_round``. Global tensors are ``trained - downloaded`` deltas, family tensors values.
   Communication knobs (both optional, in the update metadata):
   ``edgetune.bundles = "global"``: a partial FedAdapter update holding the global branch only
   (the family bundle goes every P rounds); the server averages each family bundle over the
   clients that sent it and merges the global deltas of all. ``edgetune.protocol.compression = "int8"``:
   every tensor ``<name>`` travels as I8 plus ``<name>.__scale__`` (F32, [1]); the server checks
   names, shapes, dtypes and finiteness, then uses ``q * scale`` (the blob is stored as sent).
5. ``GET /v1/status`` (join or client token), ``GET /v1/health``, ``GET /v1/openapi.json``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load

PROTOCOL_VERSION = 1
API_PREFIX = "/v1"

GROUP_GLOBAL = "global"
GROUP_FAMILY = "family"
GROUP_PRIVATE = "private"
GROUP_LORA = "lora"
UPLOAD_GROUPS = (GROUP_GLOBAL, GROUP_FAMILY, GROUP_LORA)

KIND_FEDADAPTER = "fedadapter"
KIND_LORA = "lora"

# Metadata keys of the safetensors header (all values are strings).
META_PROTOCOL = "edgetune.protocol.core"
META_KIND = "edgetune.kind"  # "update" | "global" | "family"
META_FAMILY = "edgetune.family"
META_ROUND = "edgetune.round"
META_SPEC = "edgetune.spec"  # canonical JSON of the AdapterSpec
META_SPEC_HASH = "edgetune.spec_hash"
META_FINGERPRINT = "edgetune.fingerprint"
META_DTYPE = "edgetune.dtype"
META_COMPRESSION = "edgetune.protocol.compression"
META_ENCODING = "edgetune.encoding"
META_NUM_SAMPLES = "edgetune.num_samples"
META_METRICS = "edgetune.metrics"  # JSON object of metric name -> finite number
META_BUNDLES = "edgetune.bundles"  # optional: comma-separated bundles sent (default: all)

PAYLOAD_UPDATE = "update"
PAYLOAD_GLOBAL = "global"
PAYLOAD_FAMILY = "family"

#: What each group of an upload carries: deltas for the global branch, values otherwise.
UPDATE_ENCODING = "global=delta;family=value;lora=value"
COMPRESSION_NONE = "none"
COMPRESSION_INT8 = "int8"
COMPRESSIONS = (COMPRESSION_NONE, COMPRESSION_INT8)
#: With ``compression="int8"`` every tensor ``<name>`` travels as I8 plus ``<name>.__scale__``
#: (F32, shape [1]); the value is ``int8 * scale`` (symmetric, per tensor).
SCALE_SUFFIX = ".__scale__"
INT8_MAX = 127

#: Upload bundles: the global branch (FedAdapter only) and the family bundle (everything else:
#: D/U/C/q/gates/head for FedAdapter, LoRA factors + head for LoRA). A FedAdapter client may
#: send a subset (e.g. global-only on rounds where its family bundle is not due).
BUNDLE_GLOBAL = "global"
BUNDLE_FAMILY = "family"

#: safetensors dtype tag -> (torch dtype, bytes per element). Only float types are allowed.
FLOAT_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
#: Every dtype a payload may declare: the float types plus I8 (int8-compressed updates only).
WIRE_DTYPES: dict[str, tuple[torch.dtype, int]] = {**FLOAT_DTYPES, "I8": (torch.int8, 1)}
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_METRICS = 64

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,127}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._:+/=-]{1,128}$")


class ProtocolError(ValueError):
    """A payload or spec that breaks the contract; ``code`` is a stable machine-readable tag."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a payload must contain: its name, exact shape and group."""

    name: str
    shape: tuple[int, ...]
    group: str


def anchor_layers(n_layers: int, n_anchors: int) -> list[int]:
    """Layer index of each global anchor: ``round_half_up(k * L / K) - 1`` for k = 1..K."""
    if not 1 <= n_anchors <= n_layers:
        raise ProtocolError("bad_spec", f"n_anchors={n_anchors} must be in 1..n_layers={n_layers}")
    return [(2 * k * n_layers + n_anchors) // (2 * n_anchors) - 1 for k in range(1, n_anchors + 1)]


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value > 1 << 20:
        raise ProtocolError("bad_spec", f"{name}={value!r} must be an int in {low}..{1 << 20}")


@dataclass(frozen=True)
class AdapterSpec:
    """What a client trains and uploads; the server derives the exact upload schema from it.

    ``family`` names the backbone architecture+weights, ``fingerprint`` pins its pretrained
    weights. For ``kind="lora"``, ``lora_modules`` lists ``(module, d_in, d_out)``; ``rank`` is
    the client's own rank (per-client tier choice) and may differ within a family.
    """

    family: str
    fingerprint: str
    d_model: int
    n_layers: int
    rank: int
    kind: str = KIND_FEDADAPTER
    n_anchors: int = 2
    n_classes: int = 0
    gate: str = "layer"
    dtype: str = "float32"
    lora_modules: tuple[tuple[str, int, int], ...] = field(default_factory=tuple)
    #: FedAdapter on blocks first_block..n_layers-1 only (``AdapterConfig(blocks="from:N")``);
    #: backward then stops above it (fewer FLOPs). Left out of the canonical JSON when 0.
    first_block: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.family, str) or not _NAME_RE.match(self.family):
            raise ProtocolError("bad_spec", f"family={self.family!r} must match {_NAME_RE.pattern}")
        if not isinstance(self.fingerprint, str) or not _TOKEN_RE.match(self.fingerprint):
            raise ProtocolError("bad_spec", f"fingerprint={self.fingerprint!r} is not valid")
        if self.kind not in (KIND_FEDADAPTER, KIND_LORA):
            raise ProtocolError("bad_spec", f"kind={self.kind!r} must be fedadapter or lora")
        for name in ("d_model", "n_layers", "rank"):
            _positive(name, getattr(self, name))
        _positive("n_classes", self.n_classes, allow_zero=True)
        if self.dtype not in DTYPE_NAMES:
            raise ProtocolError(
                "bad_spec", f"dtype={self.dtype!r} must be one of {list(DTYPE_NAMES)}"
            )
        if self.gate not in ("layer", "token"):
            raise ProtocolError("bad_spec", f"gate={self.gate!r} must be 'layer' or 'token'")
        if self.kind == KIND_FEDADAPTER:
            _positive("n_anchors", self.n_anchors)
            _positive("first_block", self.first_block, allow_zero=True)
            if self.first_block >= self.n_layers:
                raise ProtocolError(
                    "bad_spec", f"first_block={self.first_block} must be < n_layers={self.n_layers}"
                )
            self.anchor_layers()
        else:
            if self.first_block != 0:
                raise ProtocolError("bad_spec", "first_block applies to kind='fedadapter' only")
            self._check_lora_modules()

    def _check_lora_modules(self) -> None:
        mods = self.lora_modules
        if not mods:
            raise ProtocolError("bad_spec", "lora_modules must list at least one module")
        seen = set()
        for entry in mods:
            if not isinstance(entry, tuple) or len(entry) != 3:
                raise ProtocolError(
                    "bad_spec", f"lora module entry {entry!r} must be (name, d_in, d_out)"
                )
            name, d_in, d_out = entry
            if not isinstance(name, str) or not _MODULE_RE.match(name) or name in seen:
                raise ProtocolError("bad_spec", f"lora module name {name!r} is invalid or repeated")
            seen.add(name)
            _positive(f"{name}.d_in", d_in)
            _positive(f"{name}.d_out", d_out)

    # -- serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.first_block:
            out.pop("first_block")  # specs without it keep their canonical JSON and hash
        out["lora_modules"] = [list(m) for m in self.lora_modules]
        return out

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): what the spec hash is computed over."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterSpec:
        if not isinstance(data, Mapping):
            raise ProtocolError("bad_spec", "spec must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProtocolError("bad_spec", f"unknown spec fields: {unknown}")
        kwargs = dict(data)
        mods = kwargs.get("lora_modules", [])
        if not isinstance(mods, (list, tuple)):
            raise ProtocolError("bad_spec", "lora_modules must be a list of [name, d_in, d_out]")
        kwargs["lora_modules"] = tuple(tuple(m) if isinstance(m, list) else m for m in mods)
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ProtocolError("bad_spec", f"spec is incomplete: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> AdapterSpec:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ProtocolError("bad_spec", f"spec is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def family_key(self) -> str:
        """What every client of one family must agree on (LoRA ranks are per-client)."""
        data = self.to_dict()
        if self.kind == KIND_LORA:
            data.pop("rank")
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    # -- tensor schema -------------------------------------------------------------------
    def anchor_layers(self) -> list[int]:
        """Anchor blocks: the anchors of the adapted blocks first_block..n_layers-1."""
        adapted = self.n_layers - self.first_block
        return [self.first_block + a for a in anchor_layers(adapted, self.n_anchors)]

    def adapted_layers(self) -> range:
        return range(self.first_block, self.n_layers)

    def n_branches(self, layer: int) -> int:
        return 3 if layer in self.anchor_layers() else 2

    def global_tensors(self) -> dict[str, TensorSpec]:
        if self.kind != KIND_FEDADAPTER:
            return {}
        r = self.rank
        out: dict[str, TensorSpec] = {}
        for k in range(1, self.n_anchors + 1):
            out[f"global.anchor{k}.C"] = TensorSpec(f"global.anchor{k}.C", (r, r), GROUP_GLOBAL)
            out[f"global.anchor{k}.q"] = TensorSpec(f"global.anchor{k}.q", (r,), GROUP_GLOBAL)
        return out

    def family_tensors(self) -> dict[str, TensorSpec]:
        """Tensors aggregated within the family (FedAdapter bundle or LoRA factors + head)."""
        shapes: dict[str, tuple[int, ...]] = {}
        if self.kind == KIND_FEDADAPTER:
            d, r = self.d_model, self.rank
            for layer in self.adapted_layers():
                p = f"family.layer{layer}."
                nb = self.n_branches(layer)
                shapes.update({p + "D": (d, r), p + "b_D": (r,), p + "C": (r, r), p + "q": (r,)})
                shapes.update({p + "U": (r, d), p + "b_U": (d,)})
                if self.gate == "layer":
                    shapes[p + "alpha_logits"] = (nb,)
                else:
                    shapes[p + "W_alpha"] = (r, nb)
        else:
            for name, d_in, d_out in self.lora_modules:
                shapes[f"lora.{name}.A"] = (self.rank, d_in)
                shapes[f"lora.{name}.B"] = (d_out, self.rank)
        if self.n_classes:
            shapes["family.head.weight"] = (self.n_classes, self.d_model)
            shapes["family.head.bias"] = (self.n_classes,)
        return {n: TensorSpec(n, s, n.split(".", 1)[0]) for n, s in shapes.items()}

    def private_tensors(self) -> dict[str, TensorSpec]:
        """Client-only tensors, listed so the client can name them; never uploaded."""
        if self.kind != KIND_FEDADAPTER:
            return {}
        r, out = self.rank, {}
        for layer in self.adapted_layers():
            for leaf, shape in (("C", (r, r)), ("q", (r,))):
                name = f"private.layer{layer}.{leaf}"
                out[name] = TensorSpec(name, shape, GROUP_PRIVATE)
        return out

    def upload_tensors(self, bundles: tuple[str, ...] | None = None) -> dict[str, TensorSpec]:
        """The exact key set (and shapes) of an update sending ``bundles`` (default: all)."""
        if bundles is None:
            return dict(_upload_schema(self))
        out: dict[str, TensorSpec] = {}
        for bundle in bundles:
            out.update(self.upload_bundles()[bundle])
        return out

    def upload_bundles(self) -> dict[str, dict[str, TensorSpec]]:
        """Bundle name -> its tensors; ``global`` exists for FedAdapter specs only."""
        out = {BUNDLE_FAMILY: self.family_tensors()}
        if self.kind == KIND_FEDADAPTER:
            out = {BUNDLE_GLOBAL: self.global_tensors(), **out}
        return out

    def bundles_of(self, names: Iterable[str]) -> tuple[str, ...]:
        """Which bundles a set of tensor names touches (sorted)."""
        owner = {n: b for b, ts in self.upload_bundles().items() for n in ts}
        return tuple(sorted({owner[n] for n in names if n in owner}))


def first_block_of(blocks: str | tuple[int, ...]) -> int | None:
    """AdapterSpec.first_block for ``AdapterConfig.blocks`` ("all" -> 0, "from:N" -> N), or
    None when the blocks are an explicit list (not expressible on the wire)."""
    if blocks == "all":
        return 0
    if isinstance(blocks, str) and blocks.startswith("from:") and blocks[5:].isdigit():
        return int(blocks[5:])
    return None


@functools.lru_cache(maxsize=256)
def _upload_schema(spec: AdapterSpec) -> dict[str, TensorSpec]:
    return {**spec.global_tensors(), **spec.family_tensors()}


# -- payload encoding ------------------------------------------------------------------------
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
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
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


# -- update metadata -------------------------------------------------------------------------
@dataclass(frozen=True)
class UpdateMeta:
    """The metadata header of an update upload."""

    family: str
    round_id: int
    spec_hash: str
    fingerprint: str
    num_samples: int
    dtype: str = "float32"
    compression: str = COMPRESSION_NONE
    metrics: dict[str, float] = field(default_factory=dict)
    bundles: tuple[str, ...] | None = None  # None: every bundle of the spec

    def to_metadata(self) -> dict[str, str]:
        extra = {} if self.bundles is None else {META_BUNDLES: ",".join(sorted(self.bundles))}
        return extra | {
            META_KIND: PAYLOAD_UPDATE,
            META_FAMILY: self.family,
            META_ROUND: str(self.round_id),
            META_SPEC_HASH: self.spec_hash,
            META_FINGERPRINT: self.fingerprint,
            META_NUM_SAMPLES: str(self.num_samples),
            META_DTYPE: self.dtype,
            META_COMPRESSION: self.compression,
            META_ENCODING: UPDATE_ENCODING,
            META_METRICS: json.dumps(self.metrics, sort_keys=True),
        }

    @classmethod
    def from_metadata(cls, md: Mapping[str, str]) -> UpdateMeta:
        """Strict parse; raises ProtocolError naming the first bad key."""
        required = (META_PROTOCOL, META_KIND, META_FAMILY, META_ROUND, META_SPEC_HASH)
        required += (
            META_FINGERPRINT,
            META_NUM_SAMPLES,
            META_DTYPE,
            META_COMPRESSION,
            META_ENCODING,
        )
        missing = [k for k in required if k not in md]
        if missing:
            raise ProtocolError("missing_metadata", f"metadata lacks {missing}")
        if md[META_PROTOCOL] != str(PROTOCOL_VERSION):
            raise ProtocolError(
                "bad_protocol", f"protocol {md[META_PROTOCOL]!r} != {PROTOCOL_VERSION}"
            )
        if md[META_KIND] != PAYLOAD_UPDATE:
            raise ProtocolError("bad_metadata", f"{META_KIND}={md[META_KIND]!r}, expected 'update'")
        if md[META_ENCODING] != UPDATE_ENCODING:
            raise ProtocolError(
                "bad_metadata",
                f"{META_ENCODING}={md[META_ENCODING]!r}, expected {UPDATE_ENCODING!r}",
            )
        if md[META_COMPRESSION] not in COMPRESSIONS:
            raise ProtocolError(
                "unsupported_compression", f"compression {md[META_COMPRESSION]!r} is not supported"
            )
        if md[META_DTYPE] not in DTYPE_NAMES:
            raise ProtocolError(
                "bad_dtype", f"{META_DTYPE}={md[META_DTYPE]!r} not in {list(DTYPE_NAMES)}"
            )
        return cls(
            family=md[META_FAMILY],
            round_id=_parse_int(META_ROUND, md[META_ROUND], "bad_metadata"),
            spec_hash=md[META_SPEC_HASH],
            fingerprint=md[META_FINGERPRINT],
            num_samples=_parse_int(META_NUM_SAMPLES, md[META_NUM_SAMPLES], "bad_num_samples"),
            dtype=md[META_DTYPE],
            compression=md[META_COMPRESSION],
            metrics=_parse_metrics(md.get(META_METRICS, "{}")),
            bundles=_parse_bundles(md[META_BUNDLES]) if META_BUNDLES in md else None,
        )


def _parse_bundles(text: str) -> tuple[str, ...]:
    names = text.split(",")
    known = (BUNDLE_GLOBAL, BUNDLE_FAMILY)
    if not text or any(n not in known for n in names) or len(set(names)) != len(names):
        raise ProtocolError(
            "bad_bundles", f"{META_BUNDLES}={text!r}: a non-empty list of distinct {list(known)}"
        )
    return tuple(sorted(names))


def _parse_int(key: str, text: str, code: str) -> int:
    if not re.fullmatch(r"-?[0-9]{1,18}", text):
        raise ProtocolError(code, f"{key}={text!r} is not an integer")
    return int(text)


def _parse_metrics(text: str) -> dict[str, float]:
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError("bad_metrics", f"{META_METRICS} is not JSON: {exc}") from exc
    if not isinstance(raw, dict) or len(raw) > MAX_METRICS:
        raise ProtocolError(
            "bad_metrics", f"{META_METRICS} must be an object of <= {MAX_METRICS} entries"
        )
    out: dict[str, float] = {}
    for k, v in raw.items():
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not _MODULE_RE.match(k) or not ok:
            raise ProtocolError("bad_metrics", f"metric {k!r}={v!r} must be a finite number")
        out[k] = float(v)
    return out


def encode_update(
    tensors: Mapping[str, torch.Tensor],
    spec: AdapterSpec,
    round_id: int,
    num_samples: int,
    metrics: Mapping[str, float] | None = None,
    *,
    compression: str = COMPRESSION_NONE,
    bundles: tuple[str, ...] | None = None,
) -> bytes:
    """Encode a client update: global-branch deltas + family values, as the server expects.

    ``tensors`` are already in wire form (``compression="int8"``: I8 + ``.__scale__``, see
    :func:`quantize_int8`); ``bundles`` names a partial update (e.g. ``("global",)``).
    """
    meta = UpdateMeta(
        family=spec.family,
        round_id=round_id,
        spec_hash=spec.spec_hash,
        fingerprint=spec.fingerprint,
        num_samples=num_samples,
        dtype=spec.dtype,
        compression=compression,
        metrics=dict(metrics or {}),
        bundles=bundles,
    )
    return encode_payload(tensors, meta.to_metadata())


# -- int8 compression (symmetric, one float32 scale per tensor) -------------------------------
def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q = round(t / scale)`` in [-127, 127], ``scale = max|t| / 127``.

    A tensor of zeros gets scale 0. Every element's error ``|q * scale - t|`` is at most
    ``scale / 2``. ``t`` must be finite.
    """
    x = t.detach().to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ProtocolError("non_finite", "cannot quantize a tensor with NaN or inf values")
    amax = float(x.abs().max()) if x.numel() else 0.0
    scale = torch.tensor([amax / INT8_MAX], dtype=torch.float32)
    if amax == 0.0:
        return torch.zeros(x.shape, dtype=torch.int8), scale
    q = torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale.to(torch.float32)


def int8_wire_schema(
    expected: Mapping[str, TensorSpec],
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (safetensors dtype, shape) of an int8-compressed upload of ``expected``."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, t in expected.items():
        out[name] = ("I8", t.shape)
        out[name + SCALE_SUFFIX] = ("F32", (1,))
    return out


def decompress_tensors(
    tensors: Mapping[str, torch.Tensor], compression: str
) -> dict[str, torch.Tensor]:
    """Wire tensors -> float32 values (``int8``: ``q * scale`` for every ``<name>``)."""
    if compression == COMPRESSION_NONE:
        return dict(tensors)
    if compression != COMPRESSION_INT8:
        raise ProtocolError("unsupported_compression", f"compression {compression!r}")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        if scale is None or t.dtype != torch.int8:
            raise ProtocolError("bad_compression", f"{name!r} is not an int8 tensor with a scale")
        out[name] = dequantize_int8(t, scale)
    return out


# -- initial state and views -----------------------------------------------------------------
def family_seed(seed: int, family: str) -> int:
    """Deterministic per-family seed, so every server run initializes a family identically."""
    return (seed * 1_000_003 + zlib.crc32(family.encode())) % (1 << 63)


def initial_tensors(
    spec: AdapterSpec, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Round-0 (global, family) tensors: C = q = U = 0, D Kaiming-uniform, LoRA B = 0.

    The server materializes these once per family, so all clients of a family start from the
    same weights and the adapted model starts exactly as the backbone.
    """
    gen = torch.Generator().manual_seed(family_seed(seed, spec.family))
    dtype = FLOAT_DTYPES[DTYPE_NAMES[spec.dtype]][0]
    glob = {n: torch.zeros(t.shape, dtype=dtype) for n, t in spec.global_tensors().items()}
    fam: dict[str, torch.Tensor] = {}
    for name, t in spec.family_tensors().items():
        leaf = name.rsplit(".", 1)[1]
        if (name.endswith(".D") and t.group == GROUP_FAMILY) or (
            t.group == GROUP_LORA and leaf == "A"
        ):
            fan_in = t.shape[0] if leaf == "D" else t.shape[1]
            bound = 1.0 / math.sqrt(fan_in)
            fam[name] = (torch.rand(t.shape, generator=gen) * 2 - 1).mul_(bound).to(dtype)
        elif name == "family.head.weight":
            bound = 1.0 / math.sqrt(t.shape[1])
            fam[name] = (torch.rand(t.shape, generator=gen) * 2 - 1).mul_(bound).to(dtype)
        else:
            fam[name] = torch.zeros(t.shape, dtype=dtype)
    return glob, fam


def truncate_lora(tensors: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Fit LoRA factors to ``rank``: slice (A[:rank], B[:, :rank]) or zero-pad when smaller.

    Other tensors pass through unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        is_a = name.startswith("lora.") and name.endswith(".A")
        is_b = name.startswith("lora.") and name.endswith(".B")
        if not (is_a or is_b):
            out[name] = t
            continue
        dim = 0 if is_a else 1
        fitted = t.narrow(dim, 0, min(rank, t.shape[dim]))
        if fitted.shape[dim] < rank:
            shape = list(t.shape)
            shape[dim] = rank - fitted.shape[dim]
            fitted = torch.cat([fitted, t.new_zeros(shape)], dim=dim)
        out[name] = fitted.contiguous()
    return out
