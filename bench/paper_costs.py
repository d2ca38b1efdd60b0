"""What each client of a paper-table strategy trains, and what one local step of it costs.

Per-client ranks: federated strategies whose `rank_scope` is "client" (HetLoRA, FlexLoRA) get
every other client of a tier at half the section's rank (`het_groups`), in the base config's
client order, so every client keeps its data shard. `Profiler` measures one local training step
of each (backbone, quant, adapter, rank) once with `edgetune.measure.profile_backbone`: exact
FLOPs (FlopCounterMode) and the memory estimate.
"""

from __future__ import annotations

from typing import Any

from edgetune.protocol.names import KIND_FEDADAPTER, KIND_LORA
from edgetune.strategies import STRATEGIES

MB = 1e6


def per_client_ranks(strategy: str) -> bool:
    """True for a federated strategy that aggregates clients of different ranks (its
    `rank_scope` is "client": HetLoRA, FlexLoRA). `local` may mix ranks too, but aggregates
    nothing: it keeps the base plan, comparable with FedAdapter's single rank."""
    found = STRATEGIES[strategy]
    return found.federated and found.rank_scope == "client"


def section_of(strategy: str) -> str:
    """The config section holding the rank of what `strategy`'s clients train."""
    return "adapter" if STRATEGIES[strategy].adapter == KIND_FEDADAPTER else "lora"


def low_rank(config: dict[str, Any], strategy: str) -> int:
    """The reduced rank of every other client in the heterogeneous plan: half the default."""
    return max(1, int(config.get(section_of(strategy), {}).get("rank", 8)) // 2)


def het_groups(groups: list[dict[str, Any]], low: int) -> list[dict[str, Any]]:
    """Split every group into one client per entry, alternating full rank and `low` rank.

    The client order (and so every client's data shard) is the same as in the base config.
    """
    out = []
    for group in groups:
        for i in range(int(group.get("count", 1))):
            out.append({**group, "count": 1, "rank": 0 if i % 2 == 0 else low})
    return out


def client_setups(config: dict[str, Any], strategy: str) -> list[tuple[str, str, str, int]]:
    """(backbone, quant, adapter kind, rank) of every client of `strategy`, in client order."""
    groups = config["group"]
    if per_client_ranks(strategy):
        groups = het_groups(groups, low_rank(config, strategy))
    kind = STRATEGIES[strategy].adapter
    default = int(config[section_of(strategy)]["rank"])
    out = []
    for group in groups:
        rank = int(group.get("rank", 0)) or default
        out += [(group["backbone"], group.get("quant", "none"), kind, rank)] * int(group["count"])
    return out


class Profiler:
    """Cached `profile_backbone` runs at the config's batch size and sequence length."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.cache: dict[tuple, dict[str, Any]] = {}

    def get(self, backbone: str, quant: str, adapter: str, rank: int, **extra: Any) -> dict:
        from edgetune.measure.profile import profile_backbone

        key = (backbone, quant, adapter, rank, tuple(sorted(extra.items())))
        if key not in self.cache:
            train, adapter_cfg = self.config["train"], self.config["adapter"]
            self.cache[key] = profile_backbone(
                backbone, quant, adapter, int(train["batch_size"]), int(train["max_length"]),
                rank=rank if adapter == KIND_FEDADAPTER else int(adapter_cfg["rank"]),
                lora_rank=rank if adapter == KIND_LORA else int(self.config["lora"]["rank"]),
                lora_targets=tuple(self.config["lora"].get("targets", ("query", "value"))),
                n_classes=len(self.config["data"]["categories"]), timing=False, **extra,
            )  # fmt: skip
        return self.cache[key]

    def strategy_costs(self, strategy: str, rank: int | None = None, **extra: Any) -> dict:
        """Mean over clients: train GFLOPs per local step, train memory MB (`rank`: override)."""
        setups = [(b, q, k, rank or r) for b, q, k, r in client_setups(self.config, strategy)]
        profiles = [self.get(*s, **extra) for s in setups]
        n = len(profiles)
        return {
            "train_gflops_per_step": sum(p["flops"]["train_step"] for p in profiles) / n / 1e9,
            "train_memory_mb": sum(p["memory_estimate"]["train_bytes"] for p in profiles) / n / MB,
        }


def flops_ratios(config: dict[str, Any], profiler: Profiler) -> list[dict[str, Any]]:
    """Per backbone: FedAdapter vs full fine-tuning and vs LoRA, same batch and length."""
    rows = []
    rank, lrank = int(config["adapter"]["rank"]), int(config["lora"]["rank"])
    for backbone in sorted({g["backbone"] for g in config["group"]}):
        fed = profiler.get(backbone, "none", KIND_FEDADAPTER, rank)["flops"]["train_step"]
        lora = profiler.get(backbone, "none", KIND_LORA, lrank)["flops"]["train_step"]
        full = profiler.get(backbone, "none", "full", lrank)
        row = {"backbone": backbone, "fedadapter_gflops": fed / 1e9, "lora_gflops": lora / 1e9}
        row |= {"full_gflops": full["flops"]["train_step"] / 1e9}
        row |= {"full_memory_mb": full["memory_estimate"]["train_bytes"] / MB}
        row |= {
            "fedadapter_vs_full": fed / full["flops"]["train_step"],
            "fedadapter_vs_lora": fed / lora,
        }
        cut = profiler.get(backbone, "none", KIND_FEDADAPTER, rank, blocks="from:1")["flops"]
        row |= {"from1_gflops": cut["train_step"] / 1e9,
                "from1_vs_full": cut["train_step"] / full["flops"]["train_step"],
                "from1_vs_lora": cut["train_step"] / lora}  # fmt: skip
        rows.append(row)
    return rows
