"""The metadata header of an update upload (`UpdateMeta`) and `encode_update`."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from edgetune.protocol.codec import encode_payload
from edgetune.protocol.names import (
    BUNDLE_FAMILY,
    BUNDLE_GLOBAL,
    BUNDLE_STATS,
    COMPRESSION_NONE,
    COMPRESSIONS,
    DTYPE_NAMES,
    META_BUNDLES,
    META_COMPRESSION,
    META_DTYPE,
    META_ENCODING,
    META_FAMILY,
    META_FINGERPRINT,
    META_KIND,
    META_METRICS,
    META_NUM_SAMPLES,
    META_PROTOCOL,
    META_ROUND,
    META_SPEC_HASH,
    PAYLOAD_UPDATE,
    PROTOCOL_VERSION,
    UPDATE_ENCODING,
)
from edgetune.protocol.spec import MODULE_RE, AdapterSpec, ProtocolError

MAX_METRICS = 64
#: Largest |metric|: sample-weighted sums of many clients' metrics stay finite in float64.
MAX_METRIC = 1e12


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
    known = (BUNDLE_GLOBAL, BUNDLE_FAMILY, BUNDLE_STATS)
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
        if not MODULE_RE.match(k) or not ok or abs(v) > MAX_METRIC:
            raise ProtocolError(
                "bad_metrics",
                f"metric {k!r}={v!r} must be a finite number of |x| <= {MAX_METRIC:g}",
            )
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
