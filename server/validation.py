"""Validation of uploads before anything is stored; every failure is a 4xx ``ApiError``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from edgetune.protocol import (
    COMPRESSION_INT8,
    DTYPE_NAMES,
    GROUP_PRIVATE,
    GROUP_STATS,
    AdapterSpec,
    ProtocolError,
    TensorEntry,
    UpdateMeta,
    decompress_tensors,
    int8_wire_schema,
    parse_header,
    wire_group,
)

#: Protocol error codes that mean "these bytes are not a well-formed payload" (400); the rest
#: are well-formed payloads whose content breaks the contract (422).
MALFORMED_CODES = frozenset(
    {"not_safetensors", "header_too_large", "truncated_payload", "bad_offsets"}
)


class ApiError(Exception):
    """A client error with an HTTP status, a stable code and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.message, **self.extra}


def from_protocol_error(exc: ProtocolError) -> ApiError:
    status = 400 if exc.code in MALFORMED_CODES else 422
    return ApiError(status, exc.code, exc.message)


@dataclass(frozen=True)
class ValidatedUpdate:
    """A checked upload; ``tensors`` are float values (int8 uploads come back dequantized)."""

    meta: UpdateMeta
    tensors: dict[str, torch.Tensor]


def expected_wire_schema(
    spec: AdapterSpec, dtype: str, compression: str, bundles: tuple[str, ...] | None
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (safetensors dtype, shape) of a valid upload with this metadata."""
    if bundles is not None:
        unknown = sorted(set(bundles) - set(spec.upload_bundles()))
        if unknown:
            raise ApiError(
                422,
                "bad_bundles",
                f"bundles {unknown} do not exist for kind={spec.kind!r}; "
                f"allowed: {sorted(spec.upload_bundles())}",
            )
    expected = spec.upload_tensors(bundles)
    if compression == COMPRESSION_INT8:
        return int8_wire_schema(expected)
    return {  # class statistics are float32 whatever the adapter's dtype
        n: ("F32" if t.group == GROUP_STATS else DTYPE_NAMES[dtype], t.shape)
        for n, t in expected.items()
    }


def check_tensor_schema(
    entries: Mapping[str, tuple[str, tuple[int, ...]]],
    spec: AdapterSpec,
    dtype: str,
    compression: str = "none",
    bundles: tuple[str, ...] | None = None,
) -> None:
    """Exact key set, shapes and dtypes; ``entries`` maps name -> (safetensors dtype, shape)."""
    private = sorted(n for n in entries if n.split(".", 1)[0] == GROUP_PRIVATE)
    if private:
        raise ApiError(
            422, "private_tensor", f"private tensors must never be uploaded: {private[:5]}"
        )
    expected = expected_wire_schema(spec, dtype, compression, bundles)
    missing = sorted(set(expected) - set(entries))
    if missing:
        raise ApiError(
            422, "missing_tensors", f"{len(missing)} expected tensors missing, e.g. {missing[:5]}"
        )
    extra = sorted(set(entries) - set(expected))
    if extra:
        raise ApiError(
            422, "unexpected_tensors", f"{len(extra)} tensors not in the spec, e.g. {extra[:5]}"
        )
    for name, (etype, shape) in entries.items():
        tag, want = expected[name]
        if tuple(shape) != want:
            raise ApiError(
                422,
                "shape_mismatch",
                f"tensor {name!r} has shape {list(shape)}, expected {list(want)}",
            )
        if etype != tag:
            raise ApiError(
                422,
                "bad_dtype",
                f"tensor {name!r} has dtype {etype}, expected {tag} "
                f"(dtype {dtype}, compression {compression})",
            )


def check_finite(tensors: Mapping[str, torch.Tensor], max_abs: float = math.inf) -> None:
    """Every value finite and at most ``max_abs`` in magnitude (bounds one client's pull on an
    average, and keeps float32 sums of many clients finite)."""
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise ApiError(422, "non_finite", f"tensor {name!r} contains {bad} values")
        peak = float(t.abs().max()) if t.numel() else 0.0
        if peak > max_abs:
            raise ApiError(
                422,
                "value_too_large",
                f"tensor {name!r} holds |value| {peak:.3g} > server.max_abs_value={max_abs:g}",
            )


def _check_meta(
    meta: UpdateMeta, spec: AdapterSpec, round_id: int, max_samples: int, allowed: tuple[str, ...]
) -> None:
    if meta.family != spec.family:
        raise ApiError(
            422, "wrong_family", f"update is for family {meta.family!r}, client is {spec.family!r}"
        )
    if meta.spec_hash != spec.spec_hash:
        raise ApiError(
            422, "spec_mismatch", "update spec_hash differs from the spec this client registered"
        )
    if meta.fingerprint != spec.fingerprint:
        raise ApiError(
            422, "fingerprint_mismatch", f"backbone fingerprint {meta.fingerprint!r} != registered"
        )
    if meta.round_id != round_id:
        raise ApiError(
            422, "round_mismatch", f"metadata round {meta.round_id} != URL round {round_id}"
        )
    if not 1 <= meta.num_samples <= max_samples:
        raise ApiError(
            422, "bad_num_samples", f"num_samples={meta.num_samples} must be in 1..{max_samples}"
        )
    if meta.dtype not in allowed:
        raise ApiError(
            422, "bad_dtype", f"dtype {meta.dtype!r} not allowed; allowed: {list(allowed)}"
        )


def validate_update(
    body: bytes,
    spec: AdapterSpec,
    round_id: int,
    *,
    max_samples: int,
    allowed_dtypes: tuple[str, ...],
    max_abs_value: float = math.inf,
) -> ValidatedUpdate:
    """Parse and check an upload completely: the header is parsed once, checked (metadata,
    names, shapes, dtypes) before any tensor is built, then the tensors are loaded once."""
    try:
        metadata, entries = parse_header(body)
        meta = UpdateMeta.from_metadata(metadata)
    except ProtocolError as exc:
        raise from_protocol_error(exc) from exc
    _check_meta(meta, spec, round_id, max_samples, allowed_dtypes)
    check_tensor_schema(_entry_view(entries), spec, meta.dtype, meta.compression, meta.bundles)
    wire = _load_checked(body)
    check_finite({n: t for n, t in wire.items() if t.is_floating_point()})
    try:
        tensors = decompress_tensors(wire, meta.compression)
    except ProtocolError as exc:
        raise from_protocol_error(exc) from exc
    # class statistics are sums over the client's texts (they grow with its data): finite only;
    # the strategy checks their counts against num_samples before it uses them
    check_finite({n: t for n, t in tensors.items() if wire_group(n) != GROUP_STATS}, max_abs_value)
    return ValidatedUpdate(meta, tensors)


def _load_checked(body: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a payload whose header ``parse_header`` has already accepted."""
    try:
        return load_safetensors(bytes(body))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ApiError(
            400, "not_safetensors", f"safetensors could not load the payload: {exc}"
        ) from exc


def _entry_view(entries: Mapping[str, TensorEntry]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {n: (e.dtype, e.shape) for n, e in entries.items()}
