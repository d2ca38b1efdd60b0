"""The adapter spec a client registers with, and the exact upload schema derived from it.

`AdapterSpec` fixes what one client trains (family, backbone fingerprint, width, depth, rank,
anchors, gate, head size, LoRA modules); the server pins the first spec of each family and
derives from it the exact tensor names, shapes and bundles an upload must contain. The names
themselves come from `edgetune.protocol.names`. Torch-free.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edgetune.protocol.names import (
    BUNDLE_FAMILY,
    BUNDLE_GLOBAL,
    BUNDLE_STATS,
    DTYPE_NAMES,
    GATES,
    GROUP_GLOBAL,
    GROUP_PRIVATE,
    HEAD_BIAS,
    HEAD_WEIGHT,
    KIND_FEDADAPTER,
    KIND_LORA,
    KINDS,
    STATS_KINDS,
    STATS_LEAVES,
    anchor_blocks,
    branch_leaf_shapes,
    family_name,
    global_name,
    layer_leaf_shapes,
    lora_name,
    private_name,
    stats_bridge_name,
    stats_name,
)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MODULE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,127}$")
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


#: Upper bounds of a spec's sizes: far above any model an edge device trains (Gemma-3-270M has
#: d = 640, 18 layers; a 70B model d = 8192, 80 layers), far below what would exhaust a server.
SPEC_BOUNDS = {
    "d_model": 1 << 16,
    "n_layers": 1024,
    "rank": 1024,
    "n_anchors": 1024,
    "n_classes": 1 << 20,
    "first_block": 1023,
    "lora_modules": 4096,
    "bridges": 16,
    "stats_dim": 4096,  # a packed float32 Gram of 32 MiB at most
    "d_in": 1 << 16,
    "d_out": 1 << 20,  # an LM head's vocabulary
}
#: Bytes a safetensors header spends per tensor beyond its name (dtype, shape, offsets, quotes).
HEADER_BYTES_PER_TENSOR = 96


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    high = SPEC_BOUNDS[name.rsplit(".", 1)[-1]]
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value > high:
        raise ProtocolError("bad_spec", f"{name}={value!r} must be an int in {low}..{high}")


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
    #: Class statistics this client uploads (STATS_KINDS; the ``stats`` bundle) and the other
    #: families ``(family, d)`` whose frozen features it pairs with its own (a device that runs
    #: them too). Per client, not per family: left out of the family key, and of the canonical
    #: JSON when unset.
    stats: str = ""
    bridges: tuple[tuple[str, int], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.family, str) or not _NAME_RE.match(self.family):
            raise ProtocolError("bad_spec", f"family={self.family!r} must match {_NAME_RE.pattern}")
        if not isinstance(self.fingerprint, str) or not _TOKEN_RE.match(self.fingerprint):
            raise ProtocolError("bad_spec", f"fingerprint={self.fingerprint!r} is not valid")
        if self.kind not in KINDS:
            raise ProtocolError("bad_spec", f"kind={self.kind!r} must be one of {KINDS}")
        for name in ("d_model", "n_layers", "rank"):
            _positive(name, getattr(self, name))
        _positive("n_classes", self.n_classes, allow_zero=True)
        if self.dtype not in DTYPE_NAMES:
            raise ProtocolError(
                "bad_spec", f"dtype={self.dtype!r} must be one of {list(DTYPE_NAMES)}"
            )
        if self.gate not in GATES:
            raise ProtocolError("bad_spec", f"gate={self.gate!r} must be one of {GATES}")
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
        self._check_stats()

    def _check_stats(self) -> None:
        if self.stats not in STATS_KINDS:
            raise ProtocolError("bad_spec", f"stats={self.stats!r} must be one of {STATS_KINDS}")
        if not self.stats:
            if self.bridges:
                raise ProtocolError("bad_spec", "bridges need stats='own' or 'source'")
            return
        if self.n_classes < 2:
            raise ProtocolError("bad_spec", f"stats need n_classes >= 2, got {self.n_classes}")
        _positive("stats_dim", self.d_model)
        if not isinstance(self.bridges, tuple) or len(self.bridges) > SPEC_BOUNDS["bridges"]:
            raise ProtocolError("bad_spec", f"bridges: a tuple of at most {SPEC_BOUNDS['bridges']}")
        seen = {self.family}
        for entry in self.bridges:
            ok = isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
            if not ok or not _NAME_RE.match(entry[0]) or entry[0] in seen:
                raise ProtocolError(
                    "bad_spec", f"bridge {entry!r} must be (another family, d), each once"
                )
            seen.add(entry[0])
            _positive(f"{entry[0]}.stats_dim", entry[1])

    def _check_lora_modules(self) -> None:
        mods = self.lora_modules
        if not mods or len(mods) > SPEC_BOUNDS["lora_modules"]:
            raise ProtocolError(
                "bad_spec", f"lora_modules must list 1..{SPEC_BOUNDS['lora_modules']} modules"
            )
        seen = set()
        for entry in mods:
            if not isinstance(entry, tuple) or len(entry) != 3:
                raise ProtocolError(
                    "bad_spec", f"lora module entry {entry!r} must be (name, d_in, d_out)"
                )
            name, d_in, d_out = entry
            if not isinstance(name, str) or not MODULE_RE.match(name) or name in seen:
                raise ProtocolError("bad_spec", f"lora module name {name!r} is invalid or repeated")
            seen.add(name)
            _positive(f"{name}.d_in", d_in)
            _positive(f"{name}.d_out", d_out)

    def wire_cost(self) -> tuple[int, int]:
        """(value bytes, header bytes) of a complete upload of this spec, int8 scales included
        in the header bound; computed from shapes alone, before anything is allocated."""
        width = 4 if self.dtype == "float32" else 2
        schema = {**self.global_tensors(), **self.family_tensors()}
        values = sum(math.prod(t.shape) for t in schema.values()) * width
        stats = self.stats_tensors()
        values += sum(math.prod(t.shape) for t in stats.values()) * 4  # always float32
        schema.update(stats)
        header = 2 * sum(len(n) + 16 + HEADER_BYTES_PER_TENSOR for n in schema)
        return values, header

    # -- serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.first_block:
            out.pop("first_block")  # specs without it keep their canonical JSON and hash
        out["lora_modules"] = [list(m) for m in self.lora_modules]
        if not self.stats:
            out.pop("stats")
            out.pop("bridges")
        else:
            out["bridges"] = [list(b) for b in self.bridges]
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
        bridges = kwargs.get("bridges", [])
        if not isinstance(bridges, (list, tuple)):
            raise ProtocolError("bad_spec", "bridges must be a list of [family, d]")
        kwargs["bridges"] = tuple(tuple(b) if isinstance(b, list) else b for b in bridges)
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
        data.pop("stats", None)
        data.pop("bridges", None)
        if self.kind == KIND_LORA:
            data.pop("rank")
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    # -- tensor schema -------------------------------------------------------------------
    def anchor_layers(self) -> list[int]:
        """Anchor blocks: the anchors of the adapted blocks first_block..n_layers-1."""
        try:
            return anchor_blocks(list(self.adapted_layers()), self.n_anchors)
        except ValueError as exc:
            raise ProtocolError("bad_spec", str(exc)) from exc

    def adapted_layers(self) -> range:
        return range(self.first_block, self.n_layers)

    def n_branches(self, layer: int) -> int:
        return 3 if layer in self.anchor_layers() else 2

    def global_tensors(self) -> dict[str, TensorSpec]:
        if self.kind != KIND_FEDADAPTER:
            return {}
        shapes = branch_leaf_shapes(self.rank)
        names = {
            global_name(k, leaf): s
            for k in range(1, self.n_anchors + 1)
            for leaf, s in shapes.items()
        }
        return {n: TensorSpec(n, s, GROUP_GLOBAL) for n, s in names.items()}

    def family_tensors(self) -> dict[str, TensorSpec]:
        """Tensors aggregated within the family (FedAdapter bundle or LoRA factors + head)."""
        shapes: dict[str, tuple[int, ...]] = {}
        if self.kind == KIND_FEDADAPTER:
            for layer in self.adapted_layers():
                leaves = layer_leaf_shapes(
                    self.d_model, self.rank, self.n_branches(layer), self.gate
                )
                shapes.update({family_name(layer, leaf): s for leaf, s in leaves.items()})
        else:
            for name, d_in, d_out in self.lora_modules:
                shapes[lora_name(name, "A")] = (self.rank, d_in)
                shapes[lora_name(name, "B")] = (d_out, self.rank)
        if self.n_classes:
            shapes[HEAD_WEIGHT] = (self.n_classes, self.d_model)
            shapes[HEAD_BIAS] = (self.n_classes,)
        return {n: TensorSpec(n, s, n.split(".", 1)[0]) for n, s in shapes.items()}

    def private_tensors(self) -> dict[str, TensorSpec]:
        """Client-only tensors, listed so the client can name them; never uploaded."""
        if self.kind != KIND_FEDADAPTER:
            return {}
        shapes = branch_leaf_shapes(self.rank)
        names = {
            private_name(b, leaf): s for b in self.adapted_layers() for leaf, s in shapes.items()
        }
        return {n: TensorSpec(n, s, GROUP_PRIVATE) for n, s in names.items()}

    def stats_tensors(self) -> dict[str, TensorSpec]:
        """The ``stats`` bundle (module docstring of `edgetune.protocol.names`); {} unset."""
        if not self.stats:
            return {}
        d, k = self.d_model, self.n_classes
        leaves = dict(zip(STATS_LEAVES, ((d * (d + 1) // 2,), (k, d), (k,)), strict=True))
        parts = ("own", "frozen") if self.stats == "source" else ("own",)
        names = {stats_name(p, leaf): s for p in parts for leaf, s in leaves.items()}
        for family, d_b in self.bridges:
            names[stats_bridge_name(family, "gram")] = (d_b * (d_b + 1) // 2,)
            names[stats_bridge_name(family, "cross")] = (d_b, d)
        return {n: TensorSpec(n, s, BUNDLE_STATS) for n, s in names.items()}

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
        if self.stats:
            out[BUNDLE_STATS] = self.stats_tensors()
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
    return {**spec.global_tensors(), **spec.family_tensors(), **spec.stats_tensors()}
