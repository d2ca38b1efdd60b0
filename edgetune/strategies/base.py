"""The server side of a strategy: a Flower-like `Strategy` over the pure aggregation functions.

A strategy answers two verbs: ``configure_round`` (what clients are told for a round) and
``aggregate_round`` (replies -> new model state). Model state is a dict of named tensor dicts
keyed ``"global"`` and ``"family/<family>"``. ``aggregate_round`` first re-validates every
reply against its client's spec, logs and skips failures, and never raises for a bad reply.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from edgetune.protocol import (
    GROUP_STATS,
    HEAD_BIAS,
    HEAD_WEIGHT,
    UPDATE_ENCODING,
    AdapterSpec,
    wire_group,
)
from edgetune.strategies.aggregation import ClientUpdate, TensorDict
from edgetune.strategies.class_stats import ClientStats, heads_from_clients, stats_problem

if TYPE_CHECKING:
    from edgetune.config import RunConfig

log = logging.getLogger("edgetune.server")

GLOBAL = "global"

#: The verbs' argument types: stored models by name, the round's replies, each client's spec.
State = Mapping[str, TensorDict]
Replies = Sequence[ClientUpdate]
Specs = Mapping[str, AdapterSpec]
Models = dict[str, TensorDict]


def family_model(family: str) -> str:
    return f"family/{family}"


@dataclass
class RoundResult:
    """New model entries (only those that changed), skipped replies and a JSON summary."""

    models: dict[str, TensorDict]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def check_reply(update: ClientUpdate, spec: AdapterSpec) -> str | None:
    """Why a reply is unusable (exact keys, shapes, finite values, positive samples), or None.

    A partial reply (a subset of the spec's bundles, e.g. global-only) is usable when it holds
    every tensor of each bundle it touches.
    """
    bundles = spec.bundles_of(update.tensors)
    if not bundles:
        return "the reply holds no tensor of the spec"
    expected = spec.upload_tensors(bundles)
    if set(update.tensors) != set(expected):
        return f"key set differs from spec: {sorted(set(update.tensors) ^ set(expected))[:5]}"
    for name, t in update.tensors.items():
        if tuple(t.shape) != expected[name].shape:
            return f"{name} has shape {list(t.shape)}, expected {list(expected[name].shape)}"
    if update.num_samples <= 0:
        return f"num_samples={update.num_samples}"
    flat = torch.cat([t.reshape(-1) for t in update.tensors.values()])  # one check, not ~100
    if not bool(torch.isfinite(flat).all()):
        bad = next(n for n, t in update.tensors.items() if not bool(torch.isfinite(t).all()))
        return f"{bad} is not finite"
    stats = _stats_of(update)
    return stats_problem(stats, update.num_samples) if stats else None


def _stats_of(update: ClientUpdate) -> dict[str, torch.Tensor]:
    return {n: t for n, t in update.tensors.items() if wire_group(n) == GROUP_STATS}


def _without_stats(update: ClientUpdate) -> ClientUpdate:
    stats = _stats_of(update)
    if not stats:
        return update
    rest = {n: t for n, t in update.tensors.items() if n not in stats}
    return dataclasses.replace(update, tensors=rest)


def fit_heads(state: State, models: Models, updates: Replies) -> list[str]:
    """Replace each reporting family's head by the LDA head of the round's class statistics
    (`edgetune.strategies.class_stats`); returns the families whose head was fit."""
    reports = ((u.family, _stats_of(u)) for u in updates)
    clients = [ClientStats.from_wire(family, stats) for family, stats in reports if stats]
    fitted = []
    for family, (weight, bias) in heads_from_clients(clients).items():
        name = family_model(family)
        model = models.get(name, state.get(name))
        if model is None or HEAD_WEIGHT not in model:
            continue
        model = dict(model)
        model[HEAD_WEIGHT] = weight.to(model[HEAD_WEIGHT].dtype)
        model[HEAD_BIAS] = bias.to(model[HEAD_BIAS].dtype)
        models[name] = model
        fitted.append(family)
    return fitted


def first_non_finite(models: Models) -> str | None:
    """``model/tensor`` of the first tensor holding NaN or inf, or None."""
    for model, tensors in models.items():
        for name, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                return f"{model}/{name}"
    return None


class Strategy(ABC):
    """Base class: reply filtering, error containment and per-client download views.

    Subclasses are registered by name in `edgetune.strategies.registry` and built with
    `from_config` from the run config.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    uses_global: ClassVar[bool] = False
    per_client_views: ClassVar[bool] = False  # True when download_view depends on the client

    @classmethod
    def from_config(cls, config: RunConfig) -> Strategy:
        """The strategy for a run (subclasses with settings read them from ``config``)."""
        return cls()

    def configure_round(self, round_id: int) -> dict[str, Any]:
        """Instructions sent to every client with the round (JSON-serializable)."""
        fetch = ["global", "family"] if self.uses_global else ["family"]
        return {"strategy": self.name, "fetch": fetch, "upload_encoding": UPDATE_ENCODING}

    def check_spec(self, spec: AdapterSpec, pinned: AdapterSpec | None) -> str | None:
        """Why a client with ``spec`` cannot join (``pinned``: the family's first spec), or None."""
        if spec.kind != self.kind:
            return f"strategy {self.name} needs kind={self.kind!r}, spec has {spec.kind!r}"
        if pinned is not None and pinned.family_key() != spec.family_key():
            a, b = pinned.to_dict(), spec.to_dict()
            diff = [f"{k} ({a[k]!r} -> {b[k]!r})" for k in sorted(a) if a[k] != b[k]]
            return f"spec differs from the spec pinned for family {spec.family!r} in: {', '.join(diff)}"
        if pinned is not None and spec.rank > pinned.rank:
            return f"rank {spec.rank} exceeds the family's pinned rank {pinned.rank}"
        return None

    def download_view(self, tensors: TensorDict, spec: AdapterSpec) -> TensorDict:
        """What a client with ``spec`` receives of a stored model (default: all of it)."""
        return tensors

    def aggregate_round(
        self, round_id: int, state: State, updates: Replies, specs: Specs
    ) -> RoundResult:
        valid, skipped = [], []
        for u in updates:
            reason = check_reply(u, specs[u.client_id])
            if reason is None:
                valid.append(u)
            else:
                log.warning("skipping reply of %s in round %d: %s", u.client_id, round_id, reason)
                skipped.append((u.client_id, reason))
        if not valid:
            return RoundResult({}, skipped, {"aggregated": 0, "reason": "no valid replies"})
        core = [c for c in (_without_stats(u) for u in valid) if c.tensors]
        try:
            models = self.aggregate(round_id, state, core, specs) if core else {}
            heads = fit_heads(state, models, valid)
        except (ValueError, RuntimeError) as exc:  # numerical failure: keep the old state
            log.error("aggregation of round %d failed: %s", round_id, exc)
            return RoundResult(
                {}, skipped, {"aggregated": 0, "reason": f"aggregation failed: {exc}"}
            )
        bad = first_non_finite(models)
        if bad is not None:  # overflow of many large (each finite) replies: keep the old state
            log.error("aggregate of round %d is not finite (%s); not committed", round_id, bad)
            return RoundResult({}, skipped, {"aggregated": 0, "reason": f"{bad} not finite"})
        summary = {"aggregated": len(valid), "families": sorted({u.family for u in valid})}
        if heads:
            summary["heads_from_stats"] = heads
        return RoundResult(models, skipped, summary)

    @abstractmethod
    def aggregate(self, round_id: int, state: State, updates: Replies, specs: Specs) -> Models:
        """Valid replies -> changed model entries."""
