"""The run config: top-level keys plus the sections, from TOML and ``--set`` overrides.

One file drives `edgetune simulate`, `edgetune server` and `edgetune client`::

    rounds = 5              # the server stops after this many rounds
    strategy = "fedadapter" # a name of edgetune.strategies (the only list of names)
    seed = 0
    task = "classify"       # or "lm": causal-LM tuning of decoders on the clients' own texts
    [data] [adapter] [lora] [train] [comm] [server] [client]   (edgetune.config.sections)
    [[group]]               # one table per client tier: backbone, quant, count, rank

Every value is checked when the dataclasses are built; the error names the key and what is
allowed, before anything starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune.config.sections import (
    AdapterConfig,
    ClientConfig,
    ClientGroup,
    CommConfig,
    DataConfig,
    LoraConfig,
    ServerConfig,
    TrainConfig,
    check,
    check_int,
)
from edgetune.config.toml import apply_override, read_toml
from edgetune.errors import ConfigError
from edgetune.strategies.registry import StrategyDef, get_strategy

#: what the clients train: a classifier head (any backbone) or the decoder's own next-token
#: prediction on their texts (`lm`: held-out perplexity is the metric)
TASKS = ("classify", "lm")

SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "adapter": AdapterConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "comm": CommConfig,
    "server": ServerConfig,
    "client": ClientConfig,
}


@dataclass(frozen=True)
class RunConfig:
    rounds: int = 5
    strategy: str = "fedadapter"
    seed: int = 0
    task: str = "classify"
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    groups: tuple[ClientGroup, ...] = ()

    def __post_init__(self) -> None:
        check_int("rounds", self.rounds, 1, 100_000)
        get_strategy(self.strategy)  # raises naming the allowed values
        check_int("seed", self.seed, 0, 2**62)
        check(self.task in TASKS, "task", self.task, f"allowed values are {TASKS}")
        quorum = self.server.min_clients or self.num_clients
        if quorum:
            check(self.server.min_clients_at_deadline <= quorum,
                  "server.min_clients_at_deadline", self.server.min_clients_at_deadline,
                  f"must be <= the quorum of {quorum} clients")  # fmt: skip

    @property
    def strategy_def(self) -> StrategyDef:
        return get_strategy(self.strategy)

    @property
    def num_devices(self) -> int:
        """Devices the ``[[group]]`` tables declare: one data shard each."""
        return sum(g.count for g in self.groups)

    @property
    def num_clients(self) -> int:
        """Clients the ``[[group]]`` tables declare: one per device and backbone it trains."""
        return sum(g.count * len(g.backbones) for g in self.groups)

    def client_slots(self) -> list[tuple[int, ClientGroup, str]]:
        """(device, group, backbone) of every client in order: group by group, device by
        device, a device's own backbone before its ``also`` ones."""
        slots, device = [], 0
        for group in self.groups:
            for _ in range(group.count):
                slots += [(device, group, backbone) for backbone in group.backbones]
                device += 1
        return slots

    @property
    def quorum(self) -> int:
        """Uploads that close a round: ``server.min_clients``, 0 = every declared client."""
        if self.server.min_clients:
            return self.server.min_clients
        if not self.groups:
            raise ConfigError(
                "server.min_clients=0 means every client of the [[group]] tables, but none are "
                "declared; set server.min_clients or add [[group]] tables"
            )
        return self.num_clients

    def statistics_round(self, round_id: int) -> bool:
        """Whether round ``round_id`` gathers class statistics instead of training (server-fit
        heads, ``train.head = "stats"``, classification): round 1, so the head is fit before any
        adapter trains against it (linear probe first, then fine-tuning against that frozen
        head), and the final round of a run of 3 or more, so the final head matches the
        fine-tuned features."""
        if self.train.head != "stats" or self.task != "classify":
            return False
        return round_id == 1 or (round_id == self.rounds and self.rounds >= 3)

    def training_rounds(self) -> list[int]:
        """The rounds in which clients train (every round but the statistics rounds)."""
        return [r for r in range(1, self.rounds + 1) if not self.statistics_round(r)]

    def client_rank(self, rank: int = 0) -> int:
        """The rank a client trains: its own (``rank``) or the strategy's default."""
        if rank:
            return rank
        return self.lora.rank if self.strategy_def.adapter == "lora" else self.adapter.rank


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default (its factory called), or None for a required field."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _coerce(value: Any, default: Any, key: str) -> Any:
    """TOML values to the field's type: lists -> tuples, ints -> floats; wrong types name the key."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (bool, int, float, str)) and type(value) is not type(default):
        raise ConfigError(f"{key}={value!r}: expected a {type(default).__name__}")
    return value


def build_section(cls: type, values: Any, prefix: str) -> Any:
    """One dataclass from a table; unknown keys and wrong types are named with their prefix."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a table of keys, got {values!r}")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[prefix + k for k in unknown]}; allowed: "
            f"{[prefix + n for n in names]}"
        )
    converted = {k: _coerce(v, field_default(names[k]), prefix + k) for k, v in values.items()}
    try:
        return cls(**converted)
    except TypeError as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """A RunConfig from TOML-shaped tables (also what `simulate` writes per client as JSON)."""
    raw = dict(raw)
    sections = {
        name: build_section(cls, raw.pop(name, {}), f"{name}.") for name, cls in SECTIONS.items()
    }
    group_tables = raw.pop("group", [])
    if not isinstance(group_tables, list):
        raise ConfigError(f"group: expected [[group]] tables, got {group_tables!r}")
    groups = tuple(build_section(ClientGroup, g, "group.") for g in group_tables)
    top = {f.name: f for f in dataclasses.fields(RunConfig)}
    scalars = {k: v for k, v in raw.items() if k in top and k not in SECTIONS and k != "groups"}
    unknown = sorted(set(raw) - set(scalars))
    if unknown:
        allowed = [n for n in top if n not in SECTIONS and n != "groups"]
        raise ConfigError(
            f"unknown key(s) {unknown}; allowed: {allowed}, sections {list(SECTIONS)}"
        )
    values = {k: _coerce(v, field_default(top[k]), k) for k, v in scalars.items()}
    return RunConfig(**values, **sections, groups=groups)


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """The TOML-shaped tables of a config (``[[group]]`` as the list ``group``)."""
    out = dataclasses.asdict(config)
    out["group"] = out.pop("groups")
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Defaults < TOML file < ``--set section.key=value`` overrides, in that order."""
    raw: dict[str, Any] = read_toml(path) if path is not None else {}
    for text in overrides:
        apply_override(raw, text)
    return config_from_dict(raw)
