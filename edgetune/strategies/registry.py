"""The strategy registry: the only list of strategy names, and what each one is.

A strategy is a server side (how replies become the next model: a `Strategy` subclass) and a
client side (how a client turns its trained adapter into an upload and a download back into
weights: a `ClientHooks` subclass), registered together under one name that the config, the
server, `simulate`, the client and the benchmarks all use. Implementations are referenced as
``"module:Class"`` and imported on first use, so this module (and `edgetune.config`, which
validates names against it) loads no torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgetune.errors import ConfigError
from edgetune.protocol.names import KIND_FEDADAPTER, KIND_LORA

if TYPE_CHECKING:
    from edgetune.config import RunConfig
    from edgetune.strategies.base import Strategy
    from edgetune.strategies.hooks import ClientHooks


@dataclass(frozen=True)
class StrategyDef:
    """One registered strategy.

    ``adapter``: what clients train (``fedadapter`` or ``lora``). ``server``: the server-side
    class, or None for a strategy that runs without a server. ``client``: the client hooks.
    ``rank_scope``: where clients must agree on their rank: ``run`` (every client: FedAdapter's
    global branch is r x r in every family), ``family`` (clients of one family) or ``client``
    (each its own rank, HetLoRA-style).
    """

    name: str
    adapter: str
    summary: str
    client: str | None = None
    server: str | None = None
    rank_scope: str = "family"
    reference: bool = False  # a reference row `simulate` computes (edgetune.sim.references)

    def __post_init__(self) -> None:
        if self.rank_scope not in RANK_SCOPES:
            raise ValueError(f"{self.name}: rank_scope={self.rank_scope!r} not in {RANK_SCOPES}")

    @property
    def federated(self) -> bool:
        return self.server is not None

    def server_class(self) -> type:
        if self.server is None:
            raise ConfigError(f"strategy {self.name!r} runs without a server")
        return _load(self.server)

    def client_class(self) -> type:
        if self.client is None:
            raise ConfigError(
                f"strategy {self.name!r} is a reference row that `edgetune simulate` computes; "
                "no client takes part in it"
            )
        return _load(self.client)


RANK_SCOPES = ("run", "family", "client")


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


_FEDADAPTER = "edgetune.strategies.fedadapter"
#: The reference rows every federated result stands beside (same split, same eval subset).
REFERENCES = {
    "probe": "per family: a linear classifier on frozen features, fit on all training data",
    "centralized": "per family: the same adapter and head on all training data, same epochs",
    "homogeneous": "per family: the same federation with every client on that family",
    "isolated": "per family: FedAdapter among that family's clients alone, nothing shared",
}
_LORA = "edgetune.strategies.lora"

STRATEGIES: dict[str, StrategyDef] = {
    s.name: s
    for s in (
        StrategyDef(
            "fedadapter",
            KIND_FEDADAPTER,
            "FedAdapter: family FedAvg + cross-family merge of the global branch",
            client=f"{_FEDADAPTER}:FedAdapterClient",
            server=f"{_FEDADAPTER}:FedAdapterStrategy",
            rank_scope="run",
        ),
        StrategyDef(
            "fedavg-lora",
            KIND_LORA,
            "FedAvg of LoRA factors within a family (equal ranks)",
            client=f"{_LORA}:LoraClient",
            server=f"{_LORA}:FedAvgStrategy",
        ),
        StrategyDef(
            "hetlora",
            KIND_LORA,
            "HetLoRA: zero-pad ranks, average, truncate back",
            client=f"{_LORA}:LoraClient",
            server=f"{_LORA}:HetLoRAStrategy",
            rank_scope="client",
        ),
        StrategyDef(
            "flexlora",
            KIND_LORA,
            "FlexLoRA: average dense updates, per-client truncated SVD",
            client=f"{_LORA}:LoraClient",
            server=f"{_LORA}:FlexLoRAStrategy",
            rank_scope="client",
        ),
        StrategyDef(
            "flora",
            KIND_LORA,
            "FLoRA: stacked factors folded into the weights each round",
            client=f"{_LORA}:FloraClient",
            server=f"{_LORA}:FLoRAStrategy",
        ),
        StrategyDef(
            "local",
            KIND_FEDADAPTER,
            "local-only training, no server (a baseline)",
            client=f"{_FEDADAPTER}:LocalClient",
            rank_scope="client",
        ),
        *(
            StrategyDef(name, KIND_FEDADAPTER, summary, rank_scope="client", reference=True)
            for name, summary in REFERENCES.items()
        ),
    )
}
NAMES: tuple[str, ...] = tuple(STRATEGIES)


def get_strategy(name: str) -> StrategyDef:
    """The registered strategy ``name``; an unknown name is a ConfigError listing the known."""
    found = STRATEGIES.get(name)
    if found is None:
        raise ConfigError(f"strategy={name!r}: allowed values are {NAMES}")
    return found


def make_strategy(config: RunConfig) -> Strategy:
    """The server side of ``config.strategy``, built from the run's settings."""
    return get_strategy(config.strategy).server_class().from_config(config)


def make_client_hooks(name: str) -> ClientHooks:
    """A fresh client side of strategy ``name``."""
    return get_strategy(name).client_class()()
