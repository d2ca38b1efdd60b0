"""Update compression: the int8 codec (both sides), error feedback and the family-bundle period.

int8 (protocol ``compression="int8"``): every tensor ``<name>`` of an update travels as int8
``q`` plus a float32 scale ``<name>.__scale__`` ([1]); the server reads ``q * scale``
(``edgetune.protocol.quantize_int8``: symmetric, ``scale = max|t| / 127``, error <= scale / 2).

Error feedback: the client keeps, per tensor name, the residual ``e`` of what it meant to send
and what the server will read, and adds it to the next value it sends of that name::

    v = t + e;  q, s = quantize(v);  e <- v - q * s

so the sum of what the server received over rounds equals the sum of the true values minus the
current residual, which stays bounded by ``scale / 2`` per element (no drift).

Family period: ``family_due(round, every, final_round)`` says whether the family bundle is due
this round (every ``every``-th round and always on the final round); on other rounds a
FedAdapter client uploads only the ``global`` bundle (``bundles_to_send``).

Integration in the client (per round)::

    tensors = {n: t for n, t in tensors.items() if bundle_of(n) in bundles}
    tensors, compression = compress_update(tensors, self.error_feedback, method)
    meta = UpdateMeta(..., compression=compression, bundles=bundles)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from edgetune.errors import ConfigError
from edgetune.protocol.names import (
    BUNDLE_FAMILY,
    BUNDLE_GLOBAL,
    BUNDLE_STATS,
    COMPRESSION_INT8,
    COMPRESSION_NONE,
    COMPRESSIONS,
    GROUP_GLOBAL,
    GROUP_STATS,
    SCALE_SUFFIX,
)
from edgetune.protocol.spec import AdapterSpec, ProtocolError, TensorSpec

INT8_MAX = 127


# -- int8 codec (symmetric, one float32 scale per tensor) --------------------------------------
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
    """Name -> (safetensors dtype, shape) of an int8-compressed upload of ``expected``
    (class statistics stay float32: sums the server adds, not values it could round)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, t in expected.items():
        if t.group == GROUP_STATS:
            out[name] = ("F32", t.shape)
            continue
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
        if wire_group(name) == GROUP_STATS and t.dtype == torch.float32:
            out[name] = t
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        if scale is None or t.dtype != torch.int8:
            raise ProtocolError("bad_compression", f"{name!r} is not an int8 tensor with a scale")
        out[name] = dequantize_int8(t, scale)
    return out


# -- error feedback and bundle selection (client side) ---------------------------------------
class ErrorFeedback:
    """Per-tensor residuals of int8 compression, held by the client across rounds.

    ``residual`` maps a wire name to float32 ``e`` (the part of past values the server has not
    received yet). ``state_dict`` / ``load_state_dict`` let a client persist it with its state.
    """

    def __init__(self) -> None:
        self.residual: dict[str, Tensor] = {}

    def compress(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """int8 wire tensors of ``tensors + residual``; the residuals are updated."""
        wire: dict[str, Tensor] = {}
        for name, t in tensors.items():
            value = t.detach().to(torch.float32)
            carried = self.residual.get(name)
            if carried is not None and carried.shape == value.shape:
                value = value + carried
            q, scale = quantize_int8(value)
            self.residual[name] = value - dequantize_int8(q, scale)
            wire[name], wire[name + SCALE_SUFFIX] = q, scale
        return wire

    def clone(self) -> ErrorFeedback:
        """An independent copy (compress into it; keep it only if the upload is accepted)."""
        copy = ErrorFeedback()
        copy.load_state_dict(self.residual)
        return copy

    def state_dict(self) -> dict[str, Tensor]:
        return {n: t.clone() for n, t in self.residual.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.residual = {n: t.detach().to(torch.float32).clone() for n, t in state.items()}


def int8_without_feedback(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """int8 wire tensors of ``tensors`` (no residual carried)."""
    wire: dict[str, Tensor] = {}
    for name, t in tensors.items():
        wire[name], wire[name + SCALE_SUFFIX] = quantize_int8(t)
    return wire


def compress_update(
    tensors: Mapping[str, Tensor],
    state: ErrorFeedback | None,
    method: str = COMPRESSION_INT8,
) -> tuple[dict[str, Tensor], str]:
    """``(wire tensors, UpdateMeta.compression)`` of an update.

    ``method="none"`` returns the tensors unchanged; ``"int8"`` quantizes every tensor but the
    class statistics (float32 always). Error
    feedback (when ``state`` is an ``ErrorFeedback``) applies only to the ``global`` deltas: the
    server *accumulates* those, so carried residuals telescope; the family / LoRA tensors are
    values the server *averages*, where a carried residual would only add error, so they are
    quantized afresh each round (error <= scale / 2).
    """
    if method not in COMPRESSIONS:
        raise ConfigError(f"comm.compression={method!r}: allowed values are {COMPRESSIONS}")
    if method == COMPRESSION_NONE:
        return dict(tensors), COMPRESSION_NONE
    deltas = {n: t for n, t in tensors.items() if wire_group(n) == GROUP_GLOBAL}
    stats = {n: t for n, t in tensors.items() if wire_group(n) == GROUP_STATS}
    values = {n: t for n, t in tensors.items() if n not in deltas and n not in stats}
    wire = {**int8_without_feedback(values), **stats}
    wire.update(state.compress(deltas) if state is not None else int8_without_feedback(deltas))
    return wire, COMPRESSION_INT8


def family_due(round_id: int, every: int, final_round: int = 0) -> bool:
    """True when the family bundle goes up in ``round_id`` (1-based).

    Due every ``every``-th round (rounds every, 2*every, ...) and on ``final_round`` (0: none),
    so the last aggregate always holds a fresh family bundle. ``every=1``: every round.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"comm.family_every={every!r}: must be a positive integer")
    if round_id < 1:
        raise ConfigError(f"round {round_id} must be >= 1")
    return round_id % every == 0 or round_id == final_round


def bundles_to_send(
    spec: AdapterSpec, round_id: int, every: int, final_round: int = 0
) -> tuple[str, ...] | None:
    """The bundles a training update of ``round_id`` carries; None means all (a complete update).

    Only FedAdapter has a separate global bundle; LoRA updates carry all they train. The class
    statistics (``stats``, in a spec that has them) go up only in statistics rounds, alone.
    """
    trained = tuple(sorted(b for b in spec.upload_bundles() if b != BUNDLE_STATS))
    if BUNDLE_GLOBAL not in trained or family_due(round_id, every, final_round):
        return None if BUNDLE_STATS not in spec.upload_bundles() else trained
    return (BUNDLE_GLOBAL,)


def select_bundles(
    tensors: Mapping[str, Tensor], spec: AdapterSpec, bundles: tuple[str, ...] | None
) -> dict[str, Tensor]:
    """The tensors of an update that belong to ``bundles`` (None: all of them)."""
    if bundles is None:
        return dict(tensors)
    names = spec.upload_tensors(bundles)
    return {n: t for n, t in tensors.items() if n in names}


def wire_group(name: str) -> str:
    """The group a wire name belongs to (scales count with their tensor)."""
    base = name[: -len(SCALE_SUFFIX)] if name.endswith(SCALE_SUFFIX) else name
    group = base.split(".", 1)[0]
    return group if group in (GROUP_GLOBAL, GROUP_STATS) else BUNDLE_FAMILY
