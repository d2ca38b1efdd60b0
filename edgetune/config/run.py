"""Typed configuration of a federated run (`edgetune simulate`), from TOML plus `--set` overrides.

A config file has top-level keys and a few sections, all flat:

    rounds = 5
    strategy = "fedadapter"
    [data]      dataset, categories, alpha, ...
    [adapter]   rank, n_anchors, gate, scale, blocks
    [lora]      rank, alpha, targets            (LoRA baselines)
    [train]     epochs, batch_size, lr, max_length, time_budget_s
    [server]    round_timeout_s, beta, eta, project_conflicts
    [[group]]   backbone, quant, count           (one table per client tier)

`--set train.lr=0.001` overrides one key (values parse as TOML, bare words as strings).
Every value is checked when the dataclasses are built; the error names the key and what is
allowed, before anything starts.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune.adapters.fedadapter import AdapterConfig
from edgetune.adapters.lora import LoraConfig
from edgetune.client.trainer import TrainConfig
from edgetune.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (Jetson) ships tomli instead
    import tomli as tomllib

STRATEGIES = ("fedadapter", "fedavg-lora", "hetlora", "flexlora", "flora", "local")
QUANTS = ("none", "int8", "nf4", "fp4")
# The server strategy each simulate strategy runs on (local-only runs without aggregation).
SERVER_STRATEGY = {
    "fedadapter": "fedadapter",
    "fedavg-lora": "fedavg",
    "hetlora": "hetlora",
    "flexlora": "flexlora",
    "flora": "flora",
    "local": "fedadapter",
}


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {allowed}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fortunes"
    categories: tuple[str, ...] = ("computers", "politics", "science", "startrek", "food", "law")
    max_per_class: int = 0  # 0: all
    alpha: float = 0.5
    test_fraction: float = 0.2
    local_holdout: float = 0.2  # share of each client's data kept for personalised evaluation
    eval_samples: int = 0  # 0: the whole test split for the global evaluation

    def __post_init__(self) -> None:
        _check(
            self.alpha > 0 and math.isfinite(self.alpha), "data.alpha", self.alpha, "must be > 0"
        )
        _check(
            0 < self.test_fraction < 1,
            "data.test_fraction",
            self.test_fraction,
            "must be in (0, 1)",
        )
        _check(
            0 <= self.local_holdout < 1,
            "data.local_holdout",
            self.local_holdout,
            "must be in [0, 1)",
        )
        _check(self.max_per_class >= 0, "data.max_per_class", self.max_per_class, "must be >= 0")
        _check(self.eval_samples >= 0, "data.eval_samples", self.eval_samples, "must be >= 0")


@dataclass(frozen=True)
class ServerSettings:
    round_timeout_s: float = 600.0
    beta: float = 0.5
    eta: float = 1.0
    project_conflicts: bool = False
    min_clients: int = 0  # 0: every simulated client

    def __post_init__(self) -> None:
        _check(
            self.round_timeout_s > 0, "server.round_timeout_s", self.round_timeout_s, "must be > 0"
        )
        _check(0 <= self.beta <= 1, "server.beta", self.beta, "must be in [0, 1]")
        _check(self.eta > 0, "server.eta", self.eta, "must be > 0")
        _check(self.min_clients >= 0, "server.min_clients", self.min_clients, "must be >= 0")


@dataclass(frozen=True)
class CommConfig:
    family_every: int = 1  # FedAdapter family bundle every P rounds (global branch every round)
    compression: str = "none"  # none | int8 (per-tensor scale, client-side error feedback)

    def __post_init__(self) -> None:
        _check(1 <= self.family_every <= 1000, "comm.family_every", self.family_every,
               "must be in 1..1000")  # fmt: skip
        _check(self.compression in ("none", "int8"), "comm.compression", self.compression,
               "allowed values are ('none', 'int8')")  # fmt: skip


@dataclass(frozen=True)
class ClientGroup:
    backbone: str
    quant: str = "none"
    count: int = 1
    rank: int = 0  # 0: the run's adapter/LoRA rank; HetLoRA tiers set their own

    def __post_init__(self) -> None:
        _check(bool(self.backbone), "group.backbone", self.backbone, "must name a backbone")
        _check(self.quant in QUANTS, "group.quant", self.quant, f"allowed values are {QUANTS}")
        _check(1 <= self.count <= 64, "group.count", self.count, "must be in 1..64")
        _check(0 <= self.rank <= 128, "group.rank", self.rank, "must be in 0..128")

    @property
    def tier(self) -> str:
        return f"{self.quant}-r{self.rank}" if self.rank else self.quant


@dataclass(frozen=True)
class SimConfig:
    rounds: int = 5
    strategy: str = "fedadapter"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerSettings = field(default_factory=ServerSettings)
    comm: CommConfig = field(default_factory=CommConfig)
    groups: tuple[ClientGroup, ...] = (ClientGroup("tiny-bert"),)

    def __post_init__(self) -> None:
        _check(1 <= self.rounds <= 1000, "rounds", self.rounds, "must be in 1..1000")
        _check(
            self.strategy in STRATEGIES,
            "strategy",
            self.strategy,
            f"allowed values are {STRATEGIES}",
        )
        _check(bool(self.groups), "group", self.groups, "at least one [[group]] of clients")

    @property
    def num_clients(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def uses_lora(self) -> bool:
        return self.strategy in ("fedavg-lora", "hetlora", "flexlora", "flora")


_SECTIONS = {
    "data": DataConfig,
    "adapter": AdapterConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "server": ServerSettings,
    "comm": CommConfig,
}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a table of keys, got {values!r}")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[prefix + k for k in unknown]}; allowed: "
            f"{[prefix + n for n in names]}"
        )
    converted = {k: _coerce(v, _default(names[k]), prefix + k) for k, v in values.items()}
    try:
        return cls(**converted)
    except TypeError as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def _coerce(value: Any, default: Any, key: str) -> Any:
    """TOML values to the field's type: lists -> tuples, ints -> floats; wrong types name the key."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (bool, int, float)) and type(value) is not type(default):
        raise ConfigError(f"{key}={value!r}: expected a {type(default).__name__}")
    return value


def sim_config_from_dict(raw: dict[str, Any]) -> SimConfig:
    raw = dict(raw)
    sections = {name: _build(cls, raw.pop(name, {}), f"{name}.") for name, cls in _SECTIONS.items()}
    groups = tuple(_build(ClientGroup, g, "group.") for g in raw.pop("group", []))
    top = _build(SimConfig, {k: v for k, v in raw.items()}, "")
    return dataclasses.replace(top, **sections, **({"groups": groups} if groups else {}))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (path, value); values parse as TOML, bare words as strings."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=0.001")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.strip().split("."), parsed


def load_sim_config(path: str | Path | None, overrides: list[str] = ()) -> SimConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ConfigError(f"config file {path} does not exist") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from err
    for text in overrides:
        keys, value = parse_override(text)
        target = raw
        for part in keys[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
        target[keys[-1]] = value
    return sim_config_from_dict(raw)


_DOCS = {
    "rounds": "federated rounds",
    "strategy": f"one of {', '.join(STRATEGIES)}",
    "seed": "seeds the split, partition, server init and training",
    "data.dataset": "fortunes, mnist5k, digits or a .csv/.jsonl path",
    "data.categories": "fortunes categories (classes)",
    "data.max_per_class": "cap per class, 0 = all",
    "data.alpha": "Dirichlet label-skew concentration",
    "data.test_fraction": "shared test split",
    "data.local_holdout": "share of each client's data for personal evaluation",
    "data.eval_samples": "test samples for the global evaluation, 0 = all",
    "adapter.rank": "r, the common rank of every branch",
    "adapter.branches": "subset of global/family/private",
    "adapter.n_anchors": "K global anchor slots",
    "adapter.gate": "layer or token mixing weights",
    "adapter.scale": "s, the output scale",
    "adapter.blocks": "'all', 'from:N' or a list of blocks",
    "adapter.dropout": "dropout on the adapter input",
    "lora.rank": "LoRA rank (baselines)",
    "lora.alpha": "LoRA alpha (scaling alpha/rank)",
    "lora.targets": "module names to adapt",
    "lora.dropout": "LoRA dropout",
    "train.epochs": "local epochs per round",
    "train.batch_size": "local batch size",
    "train.lr": "AdamW learning rate",
    "train.weight_decay": "AdamW weight decay",
    "train.max_length": "token truncation",
    "train.time_budget_s": "stop local training after this many seconds, 0 = none",
    "train.seed": "shuffling seed (per client: seed * 1000 + index)",
    "server.round_timeout_s": "deadline of a round",
    "server.beta": "family balance of the merge",
    "server.eta": "server step on the global branch",
    "server.project_conflicts": "remove conflicting global deltas",
    "server.min_clients": "quorum, 0 = all",
    "comm.family_every": "FedAdapter: family bundle every P rounds, global every round",
    "comm.compression": "none or int8 (per-tensor scale + error feedback)",
    "[[group]].backbone": "zoo name or model folder",
    "[[group]].quant": "none, int8, nf4 or fp4",
    "[[group]].count": "clients in this tier",
    "[[group]].rank": "per-tier rank, 0 = the run's",
}


def config_reference() -> str:
    """The TOML reference of every key with its type and default, as the README shows it."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(SimConfig):
        if f.name not in _SECTIONS and f.name != "groups":
            rows.append(_reference_row(f.name, f))
    for section, cls in _SECTIONS.items():
        rows += [_reference_row(f"{section}.{f.name}", f) for f in dataclasses.fields(cls)]
    rows += [_reference_row(f"[[group]].{f.name}", f) for f in dataclasses.fields(ClientGroup)]
    return "\n".join(rows)


def _reference_row(key: str, f: dataclasses.Field) -> str:
    default = _default(f)
    shown = (
        "required"
        if default is None
        else repr(list(default) if isinstance(default, tuple) else default)
    )
    kind = str(f.type).replace("|", "or")
    return f"| `{key}` | {kind} | `{shown}` | {_DOCS.get(key, '')} |"
