"""The config sections: typed, torch-free dataclasses, each value checked in ``__post_init__``.

The same sections serve `simulate`, `client` and `server` (one TOML file can drive all three):
``[data]``, ``[adapter]``, ``[lora]``, ``[train]``, ``[comm]``, ``[server]``, ``[client]`` and
one ``[[group]]`` table per client tier. Every error names the key, the bad value and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from edgetune.errors import ConfigError
from edgetune.protocol.names import (
    BRANCHES,
    COMPRESSIONS,
    GATES,
    GROUP_GLOBAL,
    QUANT_MODES,
    anchor_blocks,
)

DEADLINE_POLICIES = ("extend", "abandon")
SYNC_MODES = ("NORMAL", "FULL", "EXTRA")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError ``key=value: allowed`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {allowed}")


def check_int(key: str, value: Any, low: int, high: int) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    check(ok, key, value, f"must be an integer in {low}..{high}")


def check_number(key: str, value: Any, low: float, high: float = math.inf, *, open_low=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    bound = f"({low}" if open_low else f"[{low}"
    check(ok, key, value, f"must be a finite number in {bound}, {high}]")


def section_json(section: Any) -> str:
    """Canonical JSON of a section dataclass (sorted keys, tuples as lists): what an adapter
    file and an ONNX export record as their adapter config."""
    return json.dumps(dataclasses.asdict(section), sort_keys=True)


def check_tier(section: str, backbone: str, quant: str, rank: int) -> None:
    """The keys a ``[client]`` and a ``[[group]]`` share: backbone, quant and rank."""
    check(bool(backbone), f"{section}.backbone", backbone, "must name a backbone")
    check(quant in QUANT_MODES, f"{section}.quant", quant, f"allowed values are {QUANT_MODES}")
    check_int(f"{section}.rank", rank, 0, 512)


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
        check(bool(self.dataset), "data.dataset", self.dataset, "must name a dataset or file")
        check_number("data.alpha", self.alpha, 0.0, open_low=True)
        check(0 < self.test_fraction < 1, "data.test_fraction", self.test_fraction, "in (0, 1)")
        check(0 <= self.local_holdout < 1, "data.local_holdout", self.local_holdout, "in [0, 1)")
        check_int("data.max_per_class", self.max_per_class, 0, 10**9)
        check_int("data.eval_samples", self.eval_samples, 0, 10**9)


@dataclass(frozen=True)
class AdapterConfig:
    """What a FedAdapter client trains. `blocks`: "all", "from:N" (blocks N.., 0-based) or a
    tuple of block indices."""

    rank: int = 16
    branches: tuple[str, ...] = BRANCHES
    n_anchors: int = 2
    gate: str = "layer"
    scale: float = 1.0
    blocks: str | tuple[int, ...] = "all"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_int("adapter.rank", self.rank, 1, 128)
        branches = tuple(self.branches)
        check(
            bool(branches) and tuple(b for b in BRANCHES if b in branches) == branches,
            "adapter.branches",
            self.branches,
            f"a non-empty subset of {BRANCHES}, in that order",
        )
        low = 1 if GROUP_GLOBAL in branches else 0
        check_int("adapter.n_anchors", self.n_anchors, low, 1024)
        check(self.gate in GATES, "adapter.gate", self.gate, f"allowed values are {GATES}")
        check_number("adapter.scale", self.scale, 0.0, open_low=True)
        check_number("adapter.dropout", self.dropout, 0.0, 0.999)
        parse_blocks(self.blocks, num_layers=None)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        """Inverse of `section_json`; a text that is no adapter config raises ConfigError."""
        try:
            data = json.loads(text)
            data["branches"] = tuple(data["branches"])
            if isinstance(data.get("blocks"), list):
                data["blocks"] = tuple(data["blocks"])
            return cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"adapter config {text[:80]!r} is not valid: {err}") from err

    def adapted_blocks(self, num_layers: int) -> list[int]:
        return parse_blocks(self.blocks, num_layers)

    def anchor_blocks(self, num_layers: int) -> list[int]:
        """Blocks holding a global slot (`edgetune.protocol.names.anchor_blocks`)."""
        if GROUP_GLOBAL not in self.branches:
            return []
        adapted = self.adapted_blocks(num_layers)
        if self.n_anchors > len(adapted):
            raise ConfigError(
                f"adapter.n_anchors={self.n_anchors} exceeds the {len(adapted)} adapted blocks"
            )
        return anchor_blocks(adapted, self.n_anchors)


def parse_blocks(blocks: str | tuple[int, ...], num_layers: int | None) -> list[int]:
    """The block indices `adapter.blocks` selects (checked against ``num_layers`` if given)."""
    if blocks == "all":
        return list(range(num_layers or 0))
    if isinstance(blocks, str) and blocks.startswith("from:") and blocks[5:].isdigit():
        start = int(blocks[5:])
        if num_layers is not None and start >= num_layers:
            raise ConfigError(f"adapter.blocks={blocks!r}: the backbone has {num_layers} blocks")
        return list(range(start, num_layers or 0))
    if isinstance(blocks, (tuple, list)) and blocks and all(isinstance(b, int) for b in blocks):
        chosen = sorted(set(blocks))
        if chosen[0] < 0 or (num_layers is not None and chosen[-1] >= num_layers):
            raise ConfigError(
                f"adapter.blocks={blocks!r}: indices must be in 0..{(num_layers or 1) - 1}"
            )
        return chosen
    raise ConfigError(f"adapter.blocks={blocks!r}: use 'all', 'from:N' or a list of block indices")


@dataclass(frozen=True)
class LoraConfig:
    """`targets`: module names to adapt; empty: the architecture's default, as PEFT's per-model
    table has it (`edgetune.adapters.lora.DEFAULT_TARGETS`: query/value for BERT, q_proj/v_proj
    for Llama and Gemma)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_int("lora.rank", self.rank, 1, 512)
        check_number("lora.alpha", self.alpha, 0.0, open_low=True)
        ok = all(isinstance(t, str) and t for t in self.targets)
        check(ok, "lora.targets", self.targets, "a list of module names ([] = per architecture)")
        check_number("lora.dropout", self.dropout, 0.0, 0.999)


#: Local training losses: plain cross-entropy, or the logit-adjusted ("balanced") loss of
#: Menon et al. 2021 with each client's own label prior (FedLC-style under label skew).
TRAIN_LOSSES = ("ce", "balanced")
#: How a classification head learns: "stats" (statistics rounds - round 1 and the final round
#: of a run of 3+ - gather class statistics from which the server fits each family's head,
#: bridged across families; clients keep it frozen in between) or "sgd" (trained, averaged).
HEAD_MODES = ("stats", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_length: int = 64
    time_budget_s: float = 0.0  # 0: no budget
    seed: int = 0
    loss: str = "balanced"  # ce | balanced (logits shifted by the client's own label prior)
    head_lr: float = 0.0  # 0: the same as lr ("sgd" heads)
    head: str = "stats"  # stats | sgd (HEAD_MODES)
    # head = "stats": keep the server-fit head frozen while the adapter trains (LP-FT); False
    # trains it too between statistics rounds (averaged like the family bundle; the final
    # statistics round refits it either way)
    freeze_head: bool = True

    def __post_init__(self) -> None:
        check_int("train.epochs", self.epochs, 1, 10_000)
        check(self.head in HEAD_MODES, "train.head", self.head, f"one of {HEAD_MODES}")
        check(
            isinstance(self.freeze_head, bool),
            "train.freeze_head",
            self.freeze_head,
            "true or false",
        )
        check(self.loss in TRAIN_LOSSES, "train.loss", self.loss, f"one of {TRAIN_LOSSES}")
        check_number("train.head_lr", self.head_lr, 0.0)
        check_int("train.batch_size", self.batch_size, 1, 1 << 20)
        check_int("train.max_length", self.max_length, 1, 1 << 20)
        check_number("train.lr", self.lr, 0.0, open_low=True)
        check_number("train.weight_decay", self.weight_decay, 0.0)
        check_number("train.time_budget_s", self.time_budget_s, 0.0)
        check_int("train.seed", self.seed, 0, 2**62)


@dataclass(frozen=True)
class CommConfig:
    family_every: int = 1  # FedAdapter family bundle every P rounds (global branch every round)
    compression: str = "none"  # none | int8 (per-tensor scale, client-side error feedback)

    def __post_init__(self) -> None:
        check_int("comm.family_every", self.family_every, 1, 1000)
        check(self.compression in COMPRESSIONS, "comm.compression", self.compression,
              f"allowed values are {COMPRESSIONS}")  # fmt: skip


@dataclass(frozen=True)
class ServerConfig:
    """The aggregation server; `simulate` starts one with this section as it is."""

    host: str = "127.0.0.1"
    port: int = 8080
    min_clients: int = 0  # quorum; 0: every client the [[group]] tables declare
    min_clients_at_deadline: int = 1
    round_timeout_s: float = 600.0
    on_deadline: str = "extend"
    max_extensions: int = 3
    beta: float = 0.5
    eta: float = 1.0
    project_conflicts: bool = False
    max_upload_bytes: int = 64 * 1024 * 1024
    max_num_samples: int = 100_000_000
    max_abs_value: float = 1e4  # largest |value| an update may carry
    max_families: int = 64
    max_clients: int = 10_000
    registrations_per_minute: int = 600
    body_timeout_s: float = 60.0  # an upload's body must arrive within this many seconds
    header_timeout_s: float = 10.0  # a request's head must arrive within this many seconds
    max_concurrent_uploads: int = 32
    token_ttl_s: float = 0.0  # a client token expires this long after registration; 0 = never
    allowed_dtypes: tuple[str, ...] = FLOAT_DTYPES
    tick_s: float = 0.25
    sqlite_synchronous: str = "FULL"
    fsync_blobs: bool = True
    torch_threads: int = 1  # intra-op threads for aggregation; 0 = torch's default
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        check(bool(self.host), "server.host", self.host, "must be a host name or address")
        check_int("server.port", self.port, 0, 65535)
        check_int("server.min_clients", self.min_clients, 0, 1_000_000)
        check_int("server.min_clients_at_deadline", self.min_clients_at_deadline, 1, 1_000_000)
        if self.min_clients:
            check(self.min_clients_at_deadline <= self.min_clients,
                  "server.min_clients_at_deadline", self.min_clients_at_deadline,
                  f"must be <= server.min_clients={self.min_clients}")  # fmt: skip
        check_number("server.round_timeout_s", self.round_timeout_s, 0.0, open_low=True)
        check(self.on_deadline in DEADLINE_POLICIES, "server.on_deadline", self.on_deadline,
              f"allowed values are {DEADLINE_POLICIES}")  # fmt: skip
        check_int("server.max_extensions", self.max_extensions, 0, 1000)
        check_number("server.beta", self.beta, 0.0, 1.0)
        check_number("server.eta", self.eta, 0.0, open_low=True)
        check(isinstance(self.project_conflicts, bool), "server.project_conflicts",
              self.project_conflicts, "must be true or false")  # fmt: skip
        check_int("server.max_upload_bytes", self.max_upload_bytes, 1024, 1 << 40)
        check_int("server.max_num_samples", self.max_num_samples, 1, 1 << 62)
        check_number("server.max_abs_value", self.max_abs_value, 0.0, 1e30, open_low=True)
        check_int("server.max_families", self.max_families, 1, 100_000)
        check_int("server.max_clients", self.max_clients, 1, 10_000_000)
        check_int("server.registrations_per_minute", self.registrations_per_minute, 1, 1 << 30)
        check_number("server.body_timeout_s", self.body_timeout_s, 0.0, 86_400.0, open_low=True)
        check_number("server.header_timeout_s", self.header_timeout_s, 0.0, 3600.0, open_low=True)
        check_int("server.max_concurrent_uploads", self.max_concurrent_uploads, 1, 100_000)
        check_number("server.token_ttl_s", self.token_ttl_s, 0.0, 1e9)
        ok = bool(self.allowed_dtypes) and all(d in FLOAT_DTYPES for d in self.allowed_dtypes)
        check(ok, "server.allowed_dtypes", self.allowed_dtypes, f"a subset of {FLOAT_DTYPES}")
        check_number("server.tick_s", self.tick_s, 0.0, 10.0, open_low=True)
        check(self.sqlite_synchronous in SYNC_MODES, "server.sqlite_synchronous",
              self.sqlite_synchronous, f"allowed values are {SYNC_MODES}")  # fmt: skip
        check(isinstance(self.fsync_blobs, bool), "server.fsync_blobs", self.fsync_blobs,
              "must be true or false")  # fmt: skip
        check_int("server.torch_threads", self.torch_threads, 0, 256)
        check(str(self.log_level).upper() in LOG_LEVELS, "server.log_level", self.log_level,
              f"allowed values are {LOG_LEVELS}")  # fmt: skip

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS


@dataclass(frozen=True)
class ClientConfig:
    """One client process (`edgetune client`); `simulate` fills it per client from [[group]]."""

    url: str = ""  # the server, e.g. http://127.0.0.1:8080
    ca_cert: str = ""  # PEM file of the CA that signed the server's certificate ("": system CAs)
    state_dir: str = "edgetune-client"
    backbone: str = "minilm-l3"
    quant: str = "none"
    rank: int = 0  # 0: adapter.rank (FedAdapter) or lora.rank (LoRA strategies)
    shard: int = 0  # which Dirichlet shard of the training split this client holds
    shards: int = 1  # how many shards the split is cut into (1: the whole split)
    max_rounds: int = 0  # 0: until the server finishes
    poll_s: float = 0.5
    eval_test_at_end: bool = True
    # train.head = "stats": other backbones this device also runs (their frozen features are
    # paired with ours: the bridge between the families), and whether this is the device's
    # first client (it reports its frozen backbone's statistics for the other families).
    bridges: tuple[str, ...] = ()
    stats_source: bool = True

    def __post_init__(self) -> None:
        check_tier("client", self.backbone, self.quant, self.rank)
        check_int("client.shards", self.shards, 1, 100_000)
        check_int("client.shard", self.shard, 0, self.shards - 1)
        check_int("client.max_rounds", self.max_rounds, 0, 1_000_000)
        ok = all(isinstance(b, str) and b and b != self.backbone for b in self.bridges)
        check(ok, "client.bridges", self.bridges, "backbones other than client.backbone")
        check(isinstance(self.stats_source, bool), "client.stats_source", self.stats_source,
              "must be true or false")  # fmt: skip
        check_number("client.poll_s", self.poll_s, 0.0, 60.0, open_low=True)
        url_ok = not self.url or self.url.startswith(("http://", "https://"))
        check(url_ok, "client.url", self.url, "must start with http:// or https://")

    @property
    def tier(self) -> str:
        """The tier label a client reports: its quantization, plus its rank when it sets one."""
        return f"{self.quant}-r{self.rank}" if self.rank else self.quant


@dataclass(frozen=True)
class ClientGroup:
    """One ``[[group]]`` table: `count` clients of one backbone, quantization and rank."""

    backbone: str
    quant: str = "none"
    count: int = 1
    rank: int = 0  # 0: the run's adapter/LoRA rank; HetLoRA tiers set their own
    # Backbones of other families these devices can also afford: each device trains one more
    # client of each on its own data (same shard, same quant), so a family learns from the
    # data of every device able to run it, not only of the devices that run nothing bigger.
    also: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_tier("group", self.backbone, self.quant, self.rank)
        check_int("group.count", self.count, 1, 64)
        for backbone in self.also:
            check(bool(backbone), "group.also", self.also, "entries must name backbones")
        repeated = len(set(self.also)) < len(self.also) or self.backbone in self.also
        check(not repeated, "group.also", self.also, "must not repeat a backbone")

    @property
    def backbones(self) -> tuple[str, ...]:
        """What each device of the group trains: its own backbone first, then ``also``."""
        return (self.backbone, *self.also)

    @property
    def tier(self) -> str:
        return f"{self.quant}-r{self.rank}" if self.rank else self.quant
