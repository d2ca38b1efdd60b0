"""Class statistics of pooled features: a head for every family from summed client statistics,
bridged across families through devices that run more than one (pure functions, no I/O).

Why: under label skew a family's clients may never see some classes (at Dirichlet 0.1 the demo's
four MiniLM-L6 devices hold 0 and 4 texts of two of its six classes), so a head trained by
gradient inside the family cannot know them. Sufficient statistics of pooled features are
additive across clients (FedNCM, Fed3R), and a device that runs two families sees the same texts
under both, so it can also measure how one family's feature space maps onto the other's:

    per device and family f:  G_f = sum_t x_t x_t^T  [d_f, d_f],  S_f = per-class sums [K, d_f],
                              n_f = per-class counts [K]
    per device and pair a<b:  X_ab = sum_t x_a,t x_b,t^T  [d_a, d_b]    (same texts, both spaces)

Bridge b -> a (ridge regression of a's features on b's, fit on the devices running both):
    M_ba = (sum G_b + lam I)^-1 sum X_ba,   lam = ridge * tr(sum G_b) / d_b
and the statistics of a device that runs b but not a enter a's total as (G, S, n) ->
(M^T G M, S M, n): the exact statistics of its features mapped into a's space. Each device counts
once per family (its first family with a bridge into a).

Head from the totals: linear discriminant analysis with a shrunk pooled within-class covariance
    mu_c = S_c / n_c,  W = S_w / (N - K),  Sigma = (1 - s) W + s tr(W)/d I
    logit_c(x) = x . Sigma^-1 mu_c - mu_c . Sigma^-1 mu_c / 2
(the Gaussian log-posterior under equal priors: calibrated logits a softmax head can start
from, balanced over classes as the balanced loss is). A class no device has gets a zero row and
a bias below every other class.
Everything is accumulated in float64: Gram sums cancel in the within-class covariance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Defaults from a sweep on frozen MiniLM features (2 category sets x alpha 0.5/0.3/0.1 x 3 seeds,
# L2-normalised): lam 0.05..2 and s 0.5..0.9 all within 0.5 point on the mean; (0.5, 0.9) had the
# best worst case. The bridge is fit on a few hundred texts in d = 384: it needs a firm ridge.
BRIDGE_RIDGE = 0.5  # lam as a share of the mean eigenvalue of G_b
SHRINKAGE = 0.9  # weight of the scaled identity in the LDA covariance
UNSEEN_MARGIN = 10.0  # an unseen class's bias sits this far below the lowest seen one


@dataclass(frozen=True)
class ClassStats:
    """Summed statistics of one family's pooled features: Gram, per-class sums and counts."""

    gram: Tensor  # [d, d]
    sums: Tensor  # [K, d]
    counts: Tensor  # [K]

    @classmethod
    def of(cls, features: Tensor, labels: Tensor, n_classes: int) -> ClassStats:
        x = features.to(torch.float64)
        onehot = torch.nn.functional.one_hot(labels.long(), n_classes).to(torch.float64)
        return cls(x.T @ x, onehot.T @ x, onehot.sum(0))

    def __add__(self, other: ClassStats) -> ClassStats:
        return ClassStats(
            self.gram + other.gram, self.sums + other.sums, self.counts + other.counts
        )

    def mapped(self, bridge: Tensor) -> ClassStats:
        """The statistics of the same samples with features x -> x @ bridge ([d, d'])."""
        return ClassStats(bridge.T @ self.gram @ bridge, self.sums @ bridge, self.counts)


@dataclass(frozen=True)
class DeviceStats:
    """What one device reports: statistics per family it runs, cross products per family pair
    (``cross[(a, b)]`` = sum x_a x_b^T over the same texts; one of the two orders suffices)."""

    families: Mapping[str, ClassStats]
    cross: Mapping[tuple[str, str], Tensor]

    def cross_of(self, a: str, b: str) -> Tensor | None:
        """sum x_a x_b^T, from whichever order the device reported."""
        if (a, b) in self.cross:
            return self.cross[(a, b)].to(torch.float64)
        if (b, a) in self.cross:
            return self.cross[(b, a)].to(torch.float64).T
        return None


def bridge_map(source_gram: Tensor, cross: Tensor, ridge: float = BRIDGE_RIDGE) -> Tensor:
    """Ridge map from source features to target ones: (G + lam I)^-1 X, lam = ridge*tr(G)/d."""
    d = source_gram.shape[0]
    lam = ridge * float(torch.trace(source_gram)) / d
    eye = torch.eye(d, dtype=torch.float64)
    return torch.linalg.solve(source_gram.to(torch.float64) + lam * eye, cross.to(torch.float64))


def bridges_into(
    target: str, devices: Sequence[DeviceStats], ridge: float = BRIDGE_RIDGE
) -> dict[str, Tensor]:
    """Source family -> map into ``target``'s space, fit on the devices that run both."""
    maps: dict[str, Tensor] = {}
    sources = sorted({f for dev in devices for f in dev.families if f != target})
    for source in sources:
        pairs = [dev for dev in devices if target in dev.families and source in dev.families]
        crosses = [dev.cross_of(source, target) for dev in pairs]
        if not pairs or any(c is None for c in crosses):
            continue
        gram = sum(dev.families[source].gram.to(torch.float64) for dev in pairs)
        maps[source] = bridge_map(gram, sum(crosses), ridge)
    return maps


def family_totals(
    target: str, devices: Sequence[DeviceStats], ridge: float = BRIDGE_RIDGE
) -> ClassStats | None:
    """``target``'s own statistics plus every other device's, mapped through a bridge."""
    maps = bridges_into(target, devices, ridge)
    total: ClassStats | None = None
    for dev in devices:
        if target in dev.families:
            part = dev.families[target]
        else:
            source = next((f for f in sorted(dev.families) if f in maps), None)
            if source is None:
                continue
            part = dev.families[source].mapped(maps[source])
        total = part if total is None else total + part
    return total


def lda_head(stats: ClassStats, shrinkage: float = SHRINKAGE) -> tuple[Tensor, Tensor]:
    """(weight [K, d], bias [K]) of the shrunk LDA classifier of ``stats`` (module docstring)."""
    if not 0.0 < shrinkage <= 1.0:
        raise ValueError(f"shrinkage={shrinkage} must be in (0, 1]")
    counts = stats.counts.to(torch.float64)
    seen = counts > 0
    n_seen = int(seen.sum())
    if n_seen < 2:
        raise ValueError(f"an LDA head needs samples of at least 2 classes, got {n_seen}")
    sums = stats.sums.to(torch.float64)
    means = sums / counts.clamp(min=1.0)[:, None]
    within = stats.gram.to(torch.float64) - means[seen].T @ sums[seen]
    d = within.shape[0]
    within = within / max(float(counts.sum()) - n_seen, 1.0)
    scale = float(torch.trace(within)) / d
    if not scale > 0.0:
        raise ValueError("the pooled within-class covariance is zero: features carry no spread")
    sigma = (1.0 - shrinkage) * within + shrinkage * scale * torch.eye(d, dtype=torch.float64)
    weight = torch.linalg.solve(sigma, means.T).T  # rows: Sigma^-1 mu_c
    bias = -0.5 * (weight * means).sum(1)
    weight[~seen] = 0.0
    bias[~seen] = float(bias[seen].min()) - UNSEEN_MARGIN
    return weight, bias


def family_heads(
    devices: Sequence[DeviceStats], shrinkage: float = SHRINKAGE, ridge: float = BRIDGE_RIDGE
) -> dict[str, tuple[Tensor, Tensor]]:
    """Family -> LDA (weight, bias) from every device's statistics, bridged across families."""
    heads: dict[str, tuple[Tensor, Tensor]] = {}
    for family in sorted({f for dev in devices for f in dev.families}):
        total = family_totals(family, devices, ridge)
        if total is not None:
            heads[family] = lda_head(total, shrinkage)
    return heads
