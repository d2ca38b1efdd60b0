"""Dirichlet(alpha) label-skew partitioning of a dataset over N clients.

For each class, a proportion vector p ~ Dir(alpha * 1_N) splits that class's (shuffled) samples
among the clients. Small alpha gives each client few classes; large alpha approaches IID.
Every sample goes to exactly one client. A client left empty by the draw receives one sample
from the currently largest client (deterministic given the seed), so no client has zero samples
while the skew of the draw is otherwise untouched.
"""

from __future__ import annotations

import numpy as np

from edgetune.errors import DataError


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0
) -> list[np.ndarray]:
    """Sorted sample indices per client; deterministic for (labels, num_clients, alpha, seed)."""
    labels = np.asarray(labels)
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise DataError(f"Dirichlet alpha must be a positive finite number, got {alpha}")
    if len(labels) < num_clients:
        raise DataError(
            f"cannot give {num_clients} clients a sample each from {len(labels)} samples"
        )
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.floor(np.cumsum(proportions)[:-1] * len(indices)).astype(int)
        for client, chunk in enumerate(np.split(indices, cuts)):
            parts[client].extend(chunk.tolist())
    _fill_empty_clients(parts)
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def _fill_empty_clients(parts: list[list[int]]) -> None:
    for client, part in enumerate(parts):
        if not part:
            donor = max(range(len(parts)), key=lambda k: (len(parts[k]), -k))
            parts[client].append(parts[donor].pop())


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one.

    0 for perfectly IID shards; approaches 1 - 1/classes when each client holds one class.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    global_dist = np.array([(labels == c).mean() for c in classes])
    distances = []
    for part in parts:
        local = labels[part]
        local_dist = np.array([(local == c).mean() for c in classes])
        distances.append(0.5 * np.abs(local_dist - global_dist).sum())
    return float(np.mean(distances))


def partition_summary(labels: np.ndarray, parts: list[np.ndarray], classes: list[str]) -> str:
    """Per-client counts per class, as a fixed-width table."""
    labels = np.asarray(labels)
    width = max(6, *(len(c) for c in classes))
    header = (
        f"{'client':>6} " + " ".join(f"{c[:width]:>{width}}" for c in classes) + f" {'total':>7}"
    )
    rows = [header]
    for client, part in enumerate(parts):
        counts = np.bincount(labels[part], minlength=len(classes))
        rows.append(
            f"{client:>6} " + " ".join(f"{n:>{width}}" for n in counts) + f" {len(part):>7}"
        )
    return "\n".join(rows)
