"""FedAdapter (DESIGN.md sections 3-4): the strategy's server side and client hooks."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from edgetune.protocol import KIND_FEDADAPTER, AdapterSpec
from edgetune.strategies import aggregation as agg
from edgetune.strategies.base import GLOBAL, Models, Replies, Specs, State, Strategy, family_model
from edgetune.strategies.hooks import ClientHooks

if TYPE_CHECKING:
    from edgetune.config import RunConfig


class FedAdapterStrategy(Strategy):
    """Family FedAvg of the family bundle + balanced cross-family merge of global deltas."""

    name = "fedadapter"
    kind = KIND_FEDADAPTER
    uses_global = True

    def __init__(
        self, beta: float = 0.5, eta: float = 1.0, project_conflicts: bool = False, seed: int = 0
    ) -> None:
        self.beta, self.eta, self.project, self.seed = beta, eta, project_conflicts, seed

    @classmethod
    def from_config(cls, config: RunConfig) -> FedAdapterStrategy:
        server = config.server
        return cls(server.beta, server.eta, server.project_conflicts, config.seed)

    def check_spec(self, spec: AdapterSpec, pinned: AdapterSpec | None) -> str | None:
        reason = super().check_spec(spec, pinned)
        if reason is None and pinned is not None and spec.rank != pinned.rank:
            return f"rank {spec.rank} != family rank {pinned.rank}"
        return reason

    def aggregate(self, round_id: int, state: State, updates: Replies, specs: Specs) -> Models:
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


class FedAdapterClient(ClientHooks):
    """The default hooks: global branch up as deltas, family bundle as values."""


class LocalClient(FedAdapterClient):
    """Local-only baseline: the same adapter, trained without a server."""

    federated: ClassVar[bool] = False
