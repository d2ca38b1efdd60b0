"""A client's share of a data set: one seeded Dirichlet shard, split into train and held-out."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgetune.config import DataConfig
from edgetune.data.datasets import Dataset, Split, load_dataset
from edgetune.data.partition import dirichlet_partition


def load_run_dataset(data: DataConfig, seed: int) -> Dataset:
    """The run's data set with its shared, seeded train/test split."""
    options: dict[str, Any] = {"seed": seed, "test_fraction": data.test_fraction}
    if data.dataset == "fortunes":
        if data.categories:
            options["categories"] = data.categories
        if data.max_per_class:
            options["max_per_class"] = data.max_per_class
    return load_dataset(data.dataset, **options)


def load_shard(
    data: DataConfig, seed: int, shard: int, shards: int, holdout: float | None = None
) -> tuple[Dataset, Split, Split]:
    """(dataset, local train part, local held-out part) of shard ``shard`` of ``shards``.

    Deterministic in (data, seed, shard, shards); ``holdout`` (default ``data.local_holdout``)
    is the share of the shard kept for the client's personal evaluation.
    """
    dataset = load_run_dataset(data, seed)
    parts = dirichlet_partition(dataset.train.labels, shards, data.alpha, seed=seed)
    mine = np.random.default_rng(seed + 7919 * (shard + 1)).permutation(parts[shard])
    share = data.local_holdout if holdout is None else holdout
    n_hold = round(len(mine) * share) if len(mine) > 4 else 0
    return (
        dataset,
        dataset.train.subset(np.sort(mine[n_hold:])),
        dataset.train.subset(np.sort(mine[:n_hold])),
    )
