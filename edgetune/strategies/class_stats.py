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
(M^T G M, S M, n): the exact statistics of its features mapped into a's space. A device counts
once per family: a device that runs a is in a's total through its own client of a, never mapped.

Head from the totals: linear discriminant analysis with a shrunk pooled within-class covariance
    mu_c = S_c / n_c,  W = S_w / (N - K),  Sigma = (1 - s) W + s tr(W)/d I
    logit_c(x) = x . Sigma^-1 mu_c - mu_c . Sigma^-1 mu_c / 2
(the Gaussian log-posterior under equal priors, balanced over classes as the balanced loss is).
Shrinkage makes those logits too large, so `heads_from_clients` scales each head by the
temperature that minimises its cross-entropy on the Gaussian model the statistics define
(`gaussian_temperature`): a softmax head the adapter trains against starts calibrated, with
the same argmax. A class no device has gets a zero row and a bias below every other class.
Everything is accumulated in float64: Gram sums cancel in the within-class covariance.

In a run (`ClientStats`, `totals_for`, `heads_from_clients`), statistics arrive every round with the updates
(the ``stats`` bundle). A family's own statistics are of its model *as the clients received it*
(adapter included), so the head follows the adapted features; a device's first client also
reports its *frozen* backbone's, and a client whose device runs another family b too reports
b's frozen Gram and the cross products of b's frozen features with its own current ones. The
bridge b -> a thus maps frozen b features into a's current space, and the frozen statistics of
devices that run b but not a enter a's total through it: every term of one total lives in the
same space, round after round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from edgetune.protocol.names import GROUP_STATS, STATS_LEAVES, stats_bridge_name, stats_name

log = logging.getLogger(__name__)

# Defaults from a sweep on frozen MiniLM features (2 category sets x alpha 0.5/0.3/0.1 x 3 seeds,
# L2-normalised): lam 0.05..2 and s 0.5..0.9 all within 0.5 point on the mean; (0.5, 0.9) had the
# best worst case. The bridge is fit on a few hundred texts in d = 384: it needs a firm ridge.
BRIDGE_RIDGE = 0.5  # lam as a share of the mean eigenvalue of G_b
SHRINKAGE = 0.9  # weight of the scaled identity in the LDA covariance
UNSEEN_MARGIN = 10.0  # an unseen class's bias sits this far below the lowest seen one
CALIBRATION_SAMPLES = 256  # virtual features per class for the head's logit scale
BRIDGE_LEAVES = ("gram", "cross")


def pack_symmetric(matrix: Tensor) -> Tensor:
    """The upper triangle of a symmetric [d, d] matrix, row by row: [d (d + 1) / 2] (a Gram
    travels like this: half the bytes)."""
    d = matrix.shape[0]
    rows, cols = torch.triu_indices(d, d)
    return matrix[rows, cols]


def unpack_symmetric(packed: Tensor, d: int) -> Tensor:
    """The [d, d] symmetric matrix of `pack_symmetric`'s output."""
    rows, cols = torch.triu_indices(d, d)
    out = packed.new_zeros(d, d)
    out[rows, cols] = packed
    out[cols, rows] = packed
    return out


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

    def to_wire(self, part: str) -> dict[str, Tensor]:
        """``stats.<part>.{gram,sums,counts}``, float32, the Gram packed (`ClientStats.from_wire`
        reads them back)."""
        values = (pack_symmetric(self.gram), self.sums, self.counts)
        return {
            stats_name(part, leaf): v.to(torch.float32)
            for leaf, v in zip(STATS_LEAVES, values, strict=True)
        }

    def mapped(self, bridge: Tensor) -> ClassStats:
        """The statistics of the same samples with features x -> x @ bridge ([d, d'])."""
        return ClassStats(bridge.T @ self.gram @ bridge, self.sums @ bridge, self.counts)


def bridge_map(source_gram: Tensor, cross: Tensor, ridge: float = BRIDGE_RIDGE) -> Tensor:
    """Ridge map from source features to target ones: (G + lam I)^-1 X, lam = ridge*tr(G)/d."""
    d = source_gram.shape[0]
    lam = ridge * float(torch.trace(source_gram)) / d
    eye = torch.eye(d, dtype=torch.float64)
    return torch.linalg.solve(source_gram.to(torch.float64) + lam * eye, cross.to(torch.float64))


def class_moments(stats: ClassStats) -> tuple[Tensor, Tensor, Tensor]:
    """(class means [K, d], pooled within-class covariance W [d, d], seen mask [K]) in float64:
    W = (G - sum_c n_c mu_c mu_c^T) / (N - K_seen); an unseen class's mean is 0."""
    counts = stats.counts.to(torch.float64)
    seen = counts > 0
    sums = stats.sums.to(torch.float64)
    means = sums / counts.clamp(min=1.0)[:, None]
    within = stats.gram.to(torch.float64) - means[seen].T @ sums[seen]
    within = within / max(float(counts.sum()) - int(seen.sum()), 1.0)
    return means, within, seen


def lda_head(stats: ClassStats, shrinkage: float = SHRINKAGE) -> tuple[Tensor, Tensor]:
    """(weight [K, d], bias [K]) of the shrunk LDA classifier of ``stats`` (module docstring)."""
    if not 0.0 < shrinkage <= 1.0:
        raise ValueError(f"shrinkage={shrinkage} must be in (0, 1]")
    means, within, seen = class_moments(stats)
    n_seen = int(seen.sum())
    if n_seen < 2:
        raise ValueError(f"an LDA head needs samples of at least 2 classes, got {n_seen}")
    d = within.shape[0]
    scale = float(torch.trace(within)) / d
    if not scale > 0.0:
        raise ValueError("the pooled within-class covariance is zero: features carry no spread")
    sigma = (1.0 - shrinkage) * within + shrinkage * scale * torch.eye(d, dtype=torch.float64)
    weight = torch.linalg.solve(sigma, means.T).T  # rows: Sigma^-1 mu_c
    bias = -0.5 * (weight * means).sum(1)
    weight[~seen] = 0.0
    bias[~seen] = float(bias[seen].min()) - UNSEEN_MARGIN
    return weight, bias


# -- statistics as they arrive in a run ------------------------------------------------------------
@dataclass(frozen=True)
class ClientStats:
    """One client's ``stats`` bundle: its family's statistics of the model as received, its
    frozen backbone's (None: not its device's first client) and, per other family b its device
    runs, (b's frozen Gram [d_b, d_b], sum of x_b x^T [d_b, d])."""

    family: str
    own: ClassStats
    frozen: ClassStats | None
    bridges: Mapping[str, tuple[Tensor, Tensor]]

    @classmethod
    def from_wire(cls, family: str, tensors: Mapping[str, Tensor]) -> ClientStats:
        """From an update's tensors (shapes already checked against the client's spec)."""

        def part(name: str) -> ClassStats | None:
            leaves = [tensors.get(stats_name(name, leaf)) for leaf in STATS_LEAVES]
            if leaves[0] is None:
                return None
            gram, sums, counts = (t.to(torch.float64) for t in leaves)
            return ClassStats(unpack_symmetric(gram, sums.shape[1]), sums, counts)

        own = part("own")
        if own is None:
            raise ValueError("the update holds no stats.own tensors")
        prefix = f"{GROUP_STATS}.bridge."
        others = {n[len(prefix) :].rsplit(".", 1)[0] for n in tensors if n.startswith(prefix)}
        bridges = {}
        for b in sorted(others):
            gram, cross = (
                tensors[stats_bridge_name(b, k)].to(torch.float64) for k in BRIDGE_LEAVES
            )
            bridges[b] = (unpack_symmetric(gram, cross.shape[0]), cross)
        return cls(family, own, part("frozen"), bridges)


def stats_problem(tensors: Mapping[str, Tensor], num_samples: int) -> str | None:
    """Why a (shape-checked, finite) stats bundle cannot be real statistics, or None: counts
    must be whole, non-negative and sum to at most ``num_samples``, Gram diagonals >= 0 and
    class sums within the Cauchy-Schwarz bound of counts and Gram."""
    client = ClientStats.from_wire("", tensors)
    parts = {"own": client.own, "frozen": client.frozen}
    grams = {stats_name(p, "gram"): c.gram for p, c in parts.items() if c is not None}
    grams.update({stats_bridge_name(b, "gram"): g for b, (g, _) in client.bridges.items()})
    for name, gram in grams.items():
        if bool((torch.diagonal(gram) < 0).any()):
            return f"{name} has a negative diagonal: not a Gram matrix"
    for part, stats in parts.items():
        if stats is None:
            continue
        counts, gram, sums = stats.counts, stats.gram, stats.sums
        if bool((counts < 0).any()) or not bool((counts == counts.round()).all()):
            return f"{stats_name(part, 'counts')} must hold whole non-negative counts"
        if float(counts.sum()) > num_samples:
            return f"{stats_name(part, 'counts')} sums to more than num_samples={num_samples}"
        # Cauchy-Schwarz: a class sum cannot outgrow its count times the Gram diagonal (sums
        # inflated beyond any real features would otherwise drag every class mean)
        bound = counts[:, None] * torch.diagonal(gram).clamp(min=0)[None, :]
        if bool((sums.square() > bound * (1 + 1e-3) + 1e-6).any()):
            return f"{stats_name(part, 'sums')} exceed what the counts and Gram allow"
    return None


def totals_for(
    target: str, clients: Sequence[ClientStats], ridge: float = BRIDGE_RIDGE
) -> ClassStats | None:
    """``target``'s own statistics plus the frozen ones of every device that does not run it,
    mapped through the bridge from that device's family (module docstring)."""
    own = [c.own for c in clients if c.family == target]
    if not own:
        return None
    total = own[0]
    for stats in own[1:]:
        total = total + stats
    pairs: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for c in clients:
        if c.family == target:
            for source, pair in c.bridges.items():
                pairs.setdefault(source, []).append(pair)
    maps = {
        source: bridge_map(sum(g for g, _ in ps), sum(x for _, x in ps), ridge)
        for source, ps in pairs.items()
    }
    for c in clients:
        runs_target = c.family == target or target in c.bridges
        if not runs_target and c.frozen is not None and c.family in maps:
            total = total + c.frozen.mapped(maps[c.family])
    return total


def heads_from_clients(
    clients: Sequence[ClientStats], shrinkage: float = SHRINKAGE, ridge: float = BRIDGE_RIDGE
) -> dict[str, tuple[Tensor, Tensor]]:
    """Family -> LDA (weight, bias) for every family that reported statistics.

    A family whose totals cannot give a head (fewer than two classes seen) is left out.
    """
    heads: dict[str, tuple[Tensor, Tensor]] = {}
    for family in sorted({c.family for c in clients}):
        total = totals_for(family, clients, ridge)
        if total is None or int((total.counts > 0).sum()) < 2:
            continue
        weight, bias = lda_head(total, shrinkage)
        if math.isfinite(float(weight.abs().sum() + bias.abs().sum())):
            scale = gaussian_temperature(total, weight, bias)
            heads[family] = (weight * scale, bias * scale)
    return heads


def gaussian_temperature(
    stats: ClassStats, weight: Tensor, bias: Tensor, per_class: int = CALIBRATION_SAMPLES
) -> float:
    """The logit scale t minimising the head's cross-entropy on the Gaussian model of ``stats``.

    The shrunk covariance makes LDA's logits too large: on the demo's frozen MiniLM features its
    training cross-entropy is 0.98-1.8 against 0.41-0.72 at the best scale (t = 0.20-0.28,
    measured on the real features, which the server never sees). A head trained against
    (LP-FT) with such logits lets the few misclassified texts drive the adapter. The server has
    the model the statistics define - class means mu_c and the pooled within-class covariance
    W - so it draws ``per_class`` virtual features x ~ N(mu_c, W) per seen class (a fixed seed:
    the same statistics give the same t) and picks t on a log grid; argmax, hence accuracy, is
    unchanged. On those features it gives t = 0.32-0.36: most of the way to the best scale.
    """
    means, within, seen_mask = class_moments(stats)
    seen = torch.nonzero(seen_mask).flatten()
    d = within.shape[0]
    jitter = 1e-6 * max(float(torch.trace(within)) / d, 1e-12)
    factor, info = torch.linalg.cholesky_ex(within + jitter * torch.eye(d, dtype=torch.float64))
    if int(info) != 0:
        log.warning("within-class covariance not positive definite: head keeps LDA's scale")
        return 1.0
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(len(seen) * per_class, d, generator=gen, dtype=torch.float64)
    x = means[seen].repeat_interleave(per_class, 0) + noise @ factor.T
    labels = seen.repeat_interleave(per_class)
    logits = x @ weight.T.to(torch.float64) + bias.to(torch.float64)
    scales = torch.logspace(-3, 1, 81, dtype=torch.float64)
    losses = torch.stack([torch.nn.functional.cross_entropy(logits * t, labels) for t in scales])
    return float(scales[losses.argmin()])
