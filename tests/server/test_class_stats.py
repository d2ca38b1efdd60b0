"""Class statistics, cross-family bridges and the LDA head, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from edgetune.strategies.class_stats import (
    UNSEEN_MARGIN,
    ClassStats,
    DeviceStats,
    bridge_map,
    family_heads,
    family_totals,
    lda_head,
)

F64 = torch.float64


def stats_1d() -> ClassStats:
    # class 0: x in {0, 2} (mean 1); class 1: x in {4, 6} (mean 5)
    return ClassStats.of(torch.tensor([[0.0], [2.0], [4.0], [6.0]]), torch.tensor([0, 0, 1, 1]), 2)


def test_stats_of_samples_hand_computed() -> None:
    s = stats_1d()
    assert s.gram.tolist() == [[56.0]]  # 0 + 4 + 16 + 36
    assert s.sums.tolist() == [[2.0], [10.0]]
    assert s.counts.tolist() == [2.0, 2.0]
    both = s + s
    assert both.gram.tolist() == [[112.0]] and both.counts.tolist() == [4.0, 4.0]


def test_lda_head_hand_computed() -> None:
    # within = 56 - (1*2 + 5*10) = 4, / (N - K = 2) = 2; shrinkage 0.5 toward tr/d = 2: sigma = 2
    # weight = mu / sigma = [0.5, 2.5]; bias = -mu . weight / 2 = [-0.25, -6.25]
    weight, bias = lda_head(stats_1d(), shrinkage=0.5)
    assert torch.allclose(weight, torch.tensor([[0.5], [2.5]], dtype=F64))
    assert torch.allclose(bias, torch.tensor([-0.25, -6.25], dtype=F64))
    # the decision boundary sits half-way between the class means
    at_boundary = weight @ torch.tensor([3.0], dtype=F64) + bias
    assert torch.allclose(at_boundary[0], at_boundary[1])


def test_unseen_class_gets_a_zero_row_below_every_seen_class() -> None:
    s = stats_1d()
    s3 = ClassStats(
        s.gram,
        torch.cat([s.sums, torch.zeros(1, 1, dtype=F64)]),
        torch.tensor([2.0, 2.0, 0.0], dtype=F64),
    )
    weight, bias = lda_head(s3)
    assert weight[2].abs().sum() == 0
    assert bias[2] == pytest.approx(float(bias[:2].min()) - UNSEEN_MARGIN)


@pytest.mark.parametrize("shrinkage", [0.0, 1.5])
def test_lda_head_refuses_bad_shrinkage(shrinkage: float) -> None:
    with pytest.raises(ValueError, match="shrinkage"):
        lda_head(stats_1d(), shrinkage)


def test_lda_head_needs_two_classes() -> None:
    one = ClassStats.of(torch.tensor([[1.0], [2.0]]), torch.tensor([0, 0]), 3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        lda_head(one)


def test_bridge_recovers_an_exact_linear_map() -> None:
    gen = torch.Generator().manual_seed(0)
    xb = torch.randn(200, 5, generator=gen, dtype=F64)
    true_map = torch.randn(5, 3, generator=gen, dtype=F64)
    xa = xb @ true_map
    fitted = bridge_map(xb.T @ xb, xb.T @ xa, ridge=1e-12)
    assert torch.allclose(fitted, true_map, atol=1e-8)


def _gaussian_classes(gen: torch.Generator, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(3).repeat_interleave(n)
    centres = 3.0 * torch.eye(3, d, dtype=F64)
    return centres[labels] + torch.randn(3 * n, d, generator=gen, dtype=F64), labels


def test_a_class_only_another_family_saw_reaches_the_head_through_the_bridge() -> None:
    # family "b" features are an invertible linear image of family "a"'s; device 0 runs both
    # (classes 0 and 1 only), device 1 runs only b and holds class 2.
    gen = torch.Generator().manual_seed(1)
    xa, y = _gaussian_classes(gen, 60, 4)
    to_b = torch.randn(4, 4, generator=gen, dtype=F64) + 3 * torch.eye(4, dtype=F64)
    xb = xa @ to_b
    pair, lone = y < 2, y == 2
    dev0 = DeviceStats(
        {"a": ClassStats.of(xa[pair], y[pair], 3), "b": ClassStats.of(xb[pair], y[pair], 3)},
        {("a", "b"): xa[pair].T @ xb[pair]},
    )
    dev1 = DeviceStats({"b": ClassStats.of(xb[lone], y[lone], 3)}, {})
    total = family_totals("a", [dev0, dev1], ridge=1e-12)
    direct = ClassStats.of(xa, y, 3)  # what a would have summed had it seen every sample
    assert torch.allclose(total.counts, direct.counts)
    assert torch.allclose(total.sums, direct.sums, atol=1e-6)
    assert torch.allclose(total.gram, direct.gram, atol=1e-5)
    heads = family_heads([dev0, dev1], ridge=1e-12)
    weight, bias = heads["a"]
    accuracy = ((xa @ weight.T + bias).argmax(1) == y).double().mean()
    assert accuracy > 0.95  # class 2 included: without the bridge its row would be empty
    alone, _ = family_heads([dev0])["a"]
    assert alone[2].abs().sum() == 0


def test_a_device_counts_once_per_target_family() -> None:
    gen = torch.Generator().manual_seed(2)
    x, y = _gaussian_classes(gen, 10, 3)
    s = ClassStats.of(x, y, 3)
    cross = {("a", "b"): x.T @ x, ("a", "c"): x.T @ x}
    pair = DeviceStats({"a": s, "b": s, "c": s}, cross)
    other = DeviceStats({"b": s, "c": s}, {("b", "c"): x.T @ x})  # runs two sources of a
    total = family_totals("a", [pair, other])
    assert total.counts.tolist() == (2 * s.counts).tolist()


def test_cross_products_are_read_in_either_order() -> None:
    x = torch.arange(6, dtype=F64).reshape(3, 2)
    dev = DeviceStats({}, {("a", "b"): x})
    assert torch.equal(dev.cross_of("b", "a"), x.T)
    assert dev.cross_of("a", "c") is None
