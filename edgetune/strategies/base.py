"""Flower-like strategies over the pure aggregation functions.

A strategy answers two verbs: ``configure_round`` (what clients are told for a round) and
``aggregate_round`` (replies -> new model state). Model state is a dict of named tensor dicts
keyed ``"global"`` and ``"family/<family>"``. ``aggregate_round`` first re-validates every
reply against its client's spec, logs and skips failures, and never raises for a bad reply.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from edgetune.protocol import (
    KIND_FEDADAPTER,
    KIND_LORA,
    UPDATE_ENCODING,
    AdapterSpec,
)
from edgetune.strategies import aggregation as agg
from edgetune.strategies.aggregation import ClientUpdate, TensorDict, truncate_lora

log = logging.getLogger("edgetune.server")

GLOBAL = "global"


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
    return None


class Strategy(ABC):
    """Base class: reply filtering, error containment and per-client download views."""

    name: ClassVar[str]
    kind: ClassVar[str]
    uses_global: ClassVar[bool] = False
    per_client_views: ClassVar[bool] = False  # True when download_view depends on the client

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
        self,
        round_id: int,
        state: Mapping[str, TensorDict],
        updates: Sequence[ClientUpdate],
        specs: Mapping[str, AdapterSpec],
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
        try:
            models = self.aggregate(round_id, state, valid, specs)
        except (ValueError, RuntimeError) as exc:  # numerical failure: keep the old state
            log.error("aggregation of round %d failed: %s", round_id, exc)
            return RoundResult(
                {}, skipped, {"aggregated": 0, "reason": f"aggregation failed: {exc}"}
            )
        summary = {"aggregated": len(valid), "families": sorted({u.family for u in valid})}
        return RoundResult(models, skipped, summary)

    @abstractmethod
    def aggregate(
        self,
        round_id: int,
        state: Mapping[str, TensorDict],
        updates: Sequence[ClientUpdate],
        specs: Mapping[str, AdapterSpec],
    ) -> dict[str, TensorDict]:
        """Valid replies -> changed model entries."""


class FedAdapterStrategy(Strategy):
    """DESIGN.md section 4: family FedAvg + cross-family merge of global-branch deltas."""

    name = "fedadapter"
    kind = KIND_FEDADAPTER
    uses_global = True

    def __init__(self, beta: float, eta: float, project_conflicts: bool, seed: int) -> None:
        self.beta, self.eta, self.project, self.seed = beta, eta, project_conflicts, seed

    def check_spec(self, spec: AdapterSpec, pinned: AdapterSpec | None) -> str | None:
        reason = super().check_spec(spec, pinned)
        if reason is None and pinned is not None and spec.rank != pinned.rank:
            return f"rank {spec.rank} != family rank {pinned.rank}"
        return reason

    def aggregate(self, round_id, state, updates, specs):  # type: ignore[no-untyped-def]
        res = agg.fedadapter(
            state[GLOBAL],
            updates,
            beta=self.beta,
            eta=self.eta,
            project=self.project,
            seed=self.seed * 1_000_003 + round_id,
        )
        models = {GLOBAL: res.global_params}
        models.update({family_model(m): t for m, t in res.families.items()})
        return models


class _PerFamily(Strategy):
    kind = KIND_LORA

    def aggregate(self, round_id, state, updates, specs):  # type: ignore[no-untyped-def]
        return {
            family_model(m): self.aggregate_family(us)
            for m, us in agg.group_by_family(updates).items()
        }

    @abstractmethod
    def aggregate_family(self, updates: Sequence[ClientUpdate]) -> TensorDict: ...


class FedAvgStrategy(_PerFamily):
    """Homogeneous FedAvg-LoRA: every client of a family has the same rank."""

    name = "fedavg"

    def check_spec(self, spec: AdapterSpec, pinned: AdapterSpec | None) -> str | None:
        reason = super().check_spec(spec, pinned)
        if reason is None and pinned is not None and spec.rank != pinned.rank:
            return f"fedavg needs equal ranks: {spec.rank} != {pinned.rank}"
        return reason

    def aggregate_family(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        return agg.fedavg(updates)


class HetLoRAStrategy(_PerFamily):
    name = "hetlora"
    per_client_views = True

    def aggregate_family(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        return agg.hetlora(updates)

    def download_view(self, tensors: TensorDict, spec: AdapterSpec) -> TensorDict:
        return truncate_lora(tensors, spec.rank)


class FlexLoRAStrategy(HetLoRAStrategy):
    name = "flexlora"

    def aggregate_family(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        return agg.flexlora(updates)


class FLoRAStrategy(_PerFamily):
    """Stacked factors; clients merge B @ A into their weights and restart LoRA each round."""

    name = "flora"

    def aggregate_family(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        return agg.flora(updates)


def make_strategy(
    name: str, *, beta: float = 1.0, eta: float = 1.0, project: bool = False, seed: int = 0
) -> Strategy:
    if name == "fedadapter":
        return FedAdapterStrategy(beta, eta, project, seed)
    classes: dict[str, type[Strategy]] = {
        "fedavg": FedAvgStrategy,
        "hetlora": HetLoRAStrategy,
        "flexlora": FlexLoRAStrategy,
        "flora": FLoRAStrategy,
    }
    if name not in classes:
        raise ValueError(f"unknown strategy {name!r}; known: fedadapter, {', '.join(classes)}")
    return classes[name]()
