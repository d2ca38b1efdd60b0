"""Bytes on the wire per round: ``len()`` of the safetensors bodies a client sends and receives.

Upload: the body ``ServerClient.upload`` PUTs (``UpdateMeta`` metadata with the metrics a
client reports, after the chosen compression; with a global-only bundle when the spec has one).
Download: the global and family models the server serves, their metadata included. Full
fine-tuning is no protocol kind: it reports one payload holding every trainable tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from edgetune.measure.names import ADAPTER_FULL, CLIENT_METRICS
from edgetune.protocol import (
    BUNDLE_GLOBAL,
    COMPRESSION_NONE,
    META_KIND,
    PAYLOAD_FAMILY,
    PAYLOAD_GLOBAL,
    AdapterSpec,
    ErrorFeedback,
    UpdateMeta,
    compress_update,
    encode_model,
    encode_payload,
    initial_tensors,
)

if TYPE_CHECKING:
    from edgetune.measure.setup import Setup


def update_bytes(
    spec: AdapterSpec,
    tensors: dict[str, Tensor],
    compression: str = COMPRESSION_NONE,
    bundles: tuple[str, ...] | None = None,
    metrics: dict[str, float] | None = None,
    round_id: int = 1,
) -> int:
    """Size of the update body a client PUTs (``ServerClient.upload`` encodes the same)."""
    metrics = dict(CLIENT_METRICS if metrics is None else metrics)
    names = spec.upload_tensors(bundles)
    chosen = {n: t for n, t in tensors.items() if n in names}
    state = ErrorFeedback() if compression != COMPRESSION_NONE else None
    wire, tag = compress_update(chosen, state, compression)
    meta = UpdateMeta(
        family=spec.family,
        round_id=round_id,
        spec_hash=spec.spec_hash,
        fingerprint=spec.fingerprint,
        num_samples=int(metrics.get("samples", 1)),
        dtype=spec.dtype,
        compression=tag,
        metrics=metrics,
        bundles=bundles,
    )
    return len(encode_payload(wire, meta.to_metadata()))


def download_bytes(spec: AdapterSpec, seed: int = 0, version: int = 1) -> dict[str, int]:
    """Sizes of the global and family models the server serves (its metadata included)."""
    glob, fam = initial_tensors(spec, seed)
    out = {PAYLOAD_FAMILY: len(encode_model(fam, version, spec))}
    if glob:
        out[PAYLOAD_GLOBAL] = len(encode_model(glob, version, None))
    return out


def full_bytes(setup: Setup) -> dict[str, Any]:
    """Full fine-tuning: one payload of every trainable tensor, each way, every round."""
    tensors = {f"full.{i}": p.detach() for i, p in enumerate(setup.trainable)}
    size = len(encode_payload(tensors, {META_KIND: ADAPTER_FULL}))
    return {
        "upload": {"full": size},
        "download": {"full": size},
        "upload_per_round": size,
        "download_per_round": size,
        "on_wire": False,
        "note": setup.off_wire,
    }


def wire_bytes(setup: Setup, compression: str, family_every: int) -> dict[str, Any]:
    """Upload and download bytes per round, per bundle, with ``compression``.

    A setting off the wire reports why instead (``on_wire: false`` and the reason).
    """
    if setup.adapter == ADAPTER_FULL:
        return full_bytes(setup)
    spec = setup.spec
    if spec is None:
        return {"on_wire": False, "note": setup.off_wire}
    glob, fam = initial_tensors(spec, seed=0)
    tensors = {**glob, **fam}
    upload = {"full": update_bytes(spec, tensors, compression)}
    down = download_bytes(spec)
    per_round_up = upload["full"]
    if BUNDLE_GLOBAL in spec.upload_bundles():
        upload["global_only"] = update_bytes(spec, tensors, compression, (BUNDLE_GLOBAL,))
        per_round_up = (upload["full"] + (family_every - 1) * upload["global_only"]) / family_every
    return {
        "on_wire": True,
        "upload": upload,
        "download": down,
        "upload_per_round": per_round_up,
        "download_per_round": sum(down.values()),
        "compression": compression,
        "family_every": family_every,
    }
