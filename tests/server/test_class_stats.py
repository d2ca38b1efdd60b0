"""Class statistics, cross-family bridges and the LDA head, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from edgetune.protocol import AdapterSpec, stats_bridge_name, stats_name
from edgetune.strategies.class_stats import (
    UNSEEN_MARGIN,
    ClassStats,
    ClientStats,
    bridge_map,
    gaussian_temperature,
    heads_from_clients,
    lda_head,
    pack_symmetric,
    stats_problem,
    totals_for,
    unpack_symmetric,
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


def _client(family: str, x: torch.Tensor, y: torch.Tensor, *, frozen: torch.Tensor | None = None,
            bridges: dict[str, torch.Tensor] | None = None) -> ClientStats:  # fmt: skip
    """A client of ``family`` with current features ``x``; ``frozen`` its frozen ones (a
    device's first client); ``bridges``: other family -> its frozen features of the same texts."""
    pairs = {b: (xb.T @ xb, xb.T @ x) for b, xb in (bridges or {}).items()}
    source = None if frozen is None else ClassStats.of(frozen, y, 3)
    return ClientStats(family, ClassStats.of(x, y, 3), source, pairs)


def test_a_class_only_another_family_saw_reaches_the_head_through_the_bridge() -> None:
    # family "b"'s frozen features are an invertible linear image of family "a"'s current ones;
    # device 0 runs both (classes 0 and 1 only), device 1 runs only b and holds class 2.
    gen = torch.Generator().manual_seed(1)
    xa, y = _gaussian_classes(gen, 60, 4)
    to_b = torch.randn(4, 4, generator=gen, dtype=F64) + 3 * torch.eye(4, dtype=F64)
    xb = xa @ to_b
    pair, lone = y < 2, y == 2
    dev0_a = _client("a", xa[pair], y[pair], frozen=xa[pair], bridges={"b": xb[pair]})
    dev0_b = _client("b", xb[pair], y[pair])  # the device's second client: no frozen part
    dev1 = _client("b", xb[lone], y[lone], frozen=xb[lone])
    clients = [dev0_a, dev0_b, dev1]
    total = totals_for("a", clients, ridge=1e-12)
    direct = ClassStats.of(xa, y, 3)  # what a would have summed had it seen every sample
    assert torch.allclose(total.counts, direct.counts)
    assert torch.allclose(total.sums, direct.sums, atol=1e-6)
    assert torch.allclose(total.gram, direct.gram, atol=1e-5)
    weight, bias = heads_from_clients(clients, ridge=1e-12)["a"]
    accuracy = ((xa @ weight.T + bias).argmax(1) == y).double().mean()
    assert accuracy > 0.95  # class 2 included: without the bridge its row would be empty
    alone, _ = heads_from_clients([dev0_a])["a"]
    assert alone[2].abs().sum() == 0
    # b's own total: both of its clients, nothing mapped back from a (device 0 runs b itself)
    assert totals_for("b", clients).counts.tolist() == ClassStats.of(xb, y, 3).counts.tolist()


def test_the_bridge_maps_frozen_source_features_into_the_current_target_space() -> None:
    # a's features drifted since the start (current = frozen @ drift): the bridge is fit from
    # b's frozen features to a's *current* ones, so b's lone device lands where a's model is now
    gen = torch.Generator().manual_seed(3)
    xb, y = _gaussian_classes(gen, 50, 4)
    drift = torch.randn(4, 4, generator=gen, dtype=F64) + 2 * torch.eye(4, dtype=F64)
    xa_frozen, pair = xb.clone(), y < 2
    xa_now = xa_frozen @ drift
    dev0 = _client("a", xa_now[pair], y[pair], frozen=xa_frozen[pair], bridges={"b": xb[pair]})
    dev1 = _client("b", xb[~pair], y[~pair], frozen=xb[~pair])
    total = totals_for("a", [dev0, dev1], ridge=1e-12)
    assert torch.allclose(total.sums, ClassStats.of(xa_now, y, 3).sums, atol=1e-6)


def test_a_device_counts_once_per_target_family() -> None:
    gen = torch.Generator().manual_seed(2)
    x, y = _gaussian_classes(gen, 10, 3)
    # device 0 runs a (bridging b and c), device 1 runs b (first) and c: mapped into a once
    dev0 = _client("a", x, y, frozen=x, bridges={"b": x, "c": x})
    dev1_b = _client("b", x, y, frozen=x, bridges={"c": x})
    dev1_c = _client("c", x, y)
    total = totals_for("a", [dev0, dev1_b, dev1_c])
    assert total.counts.tolist() == (2 * ClassStats.of(x, y, 3).counts).tolist()


def _wire(spec: AdapterSpec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    x = torch.randn(20, spec.d_model, generator=gen, dtype=F64)
    y = torch.arange(20) % spec.n_classes
    s = ClassStats.of(x, y, spec.n_classes)
    out = {}
    for part in ("own", "frozen") if spec.stats == "source" else ("own",):
        out[stats_name(part, "gram")] = pack_symmetric(s.gram).float()
        out.update({stats_name(part, k): getattr(s, k).float() for k in ("sums", "counts")})
    for family, d_b in spec.bridges:
        xb = torch.randn(20, d_b, generator=gen, dtype=F64)
        out[stats_bridge_name(family, "gram")] = pack_symmetric(xb.T @ xb).float()
        out[stats_bridge_name(family, "cross")] = (xb.T @ x).float()
    return out


def test_wire_tensors_round_trip_into_client_stats() -> None:
    spec = AdapterSpec("a", "fp", 5, 2, 4, n_classes=3, stats="source", bridges=(("b", 7),))
    wire = _wire(spec, torch.Generator().manual_seed(4))
    assert set(wire) == set(spec.stats_tensors())
    for name, t in wire.items():
        assert tuple(t.shape) == spec.stats_tensors()[name].shape
    client = ClientStats.from_wire("a", wire)
    assert client.own.gram.dtype == F64 and client.frozen is not None
    assert set(client.bridges) == {"b"} and client.bridges["b"][1].shape == (7, 5)
    assert stats_problem(wire, num_samples=20) is None


@pytest.mark.parametrize(
    ("leaf", "value", "problem"),
    [
        ("counts", [-1.0, 10.0, 11.0], "whole non-negative"),
        ("counts", [0.5, 10.0, 9.5], "whole non-negative"),
        ("counts", [7.0, 7.0, 7.0], "more than num_samples"),
    ],
)
def test_implausible_statistics_are_named(leaf: str, value: list[float], problem: str) -> None:
    spec = AdapterSpec("a", "fp", 5, 2, 4, n_classes=3, stats="own")
    wire = _wire(spec, torch.Generator().manual_seed(5))
    wire[stats_name("own", leaf)] = torch.tensor(value)
    assert problem in stats_problem(wire, num_samples=20)


def test_class_sums_beyond_what_counts_and_gram_allow_are_refused() -> None:
    spec = AdapterSpec("a", "fp", 5, 2, 4, n_classes=3, stats="own")
    wire = _wire(spec, torch.Generator().manual_seed(8))
    wire[stats_name("own", "sums")][1, 3] = 1e6  # a poisoned mean, Gram left as it was
    assert "exceed what the counts and Gram allow" in stats_problem(wire, num_samples=20)


def test_a_gram_with_a_negative_diagonal_is_refused() -> None:
    spec = AdapterSpec("a", "fp", 5, 2, 4, n_classes=3, stats="own")
    wire = _wire(spec, torch.Generator().manual_seed(6))
    wire[stats_name("own", "gram")][0] = -1.0  # packed row by row: [0] is the (0, 0) entry
    assert "negative diagonal" in stats_problem(wire, num_samples=20)


def test_a_round_of_statistics_fits_the_head_and_skips_an_implausible_reply() -> None:
    from edgetune.protocol import HEAD_BIAS, HEAD_WEIGHT, initial_tensors
    from edgetune.strategies.aggregation import ClientUpdate
    from edgetune.strategies.base import family_model
    from edgetune.strategies.fedadapter import FedAdapterStrategy

    spec = AdapterSpec("a", "fp", 5, 2, 4, n_classes=3, stats="own")
    glob, fam = initial_tensors(spec, seed=0)
    state = {"global": glob, family_model("a"): fam}
    good = _wire(spec, torch.Generator().manual_seed(7))
    bad = dict(good) | {stats_name("own", "counts"): torch.tensor([-5.0, 10.0, 10.0])}
    updates = [ClientUpdate("c1", "a", 20, good), ClientUpdate("c2", "a", 20, bad)]
    result = FedAdapterStrategy().aggregate_round(1, state, updates, {"c1": spec, "c2": spec})
    assert [c for c, _ in result.skipped] == ["c2"] and result.summary["heads_from_stats"] == ["a"]
    model = result.models[family_model("a")]
    own = ClientStats.from_wire("a", good).own
    weight, bias = lda_head(own)
    scale = gaussian_temperature(own, weight, bias)  # the served head is the calibrated LDA
    weight, bias = weight * scale, bias * scale
    assert torch.allclose(model[HEAD_WEIGHT].double(), weight, rtol=1e-5, atol=1e-6)
    assert torch.allclose(model[HEAD_BIAS].double(), bias, rtol=1e-5, atol=1e-5)
    unchanged = [n for n in fam if n not in (HEAD_WEIGHT, HEAD_BIAS)]
    assert all(torch.equal(model[n], fam[n]) for n in unchanged)  # nothing else moved
    assert "global" not in result.models  # no adapter was trained this round


def test_a_gram_travels_as_its_upper_triangle() -> None:
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(9), dtype=F64)
    packed = pack_symmetric(x.T @ x)
    assert packed.shape == (10,) and packed[1] == (x.T @ x)[0, 1]  # row 0: (0,0), (0,1), ...
    assert torch.equal(unpack_symmetric(packed, 4), x.T @ x)


def _classes(gen: torch.Generator, spread: torch.Tensor, n: int = 400) -> tuple:
    """Three Gaussian classes in d = len(spread), means 3 apart along axis 0, per-axis std."""
    d = len(spread)
    means = torch.zeros(3, d, dtype=F64)
    means[:, 0] = torch.tensor([-3.0, 0.0, 3.0], dtype=F64)
    y = torch.arange(3).repeat_interleave(n)
    return means[y] + torch.randn(3 * n, d, generator=gen, dtype=F64) * spread, y


def test_isotropic_classes_need_no_temperature() -> None:
    # W = sigma^2 I: shrinkage toward tr(W)/d I leaves Sigma = W, so LDA's logits are the exact
    # Gaussian log-posterior and the best scale is 1 (tolerance: the log grid's 12% step plus
    # the sampling noise of 256 virtual features per class)
    x, y = _classes(torch.Generator().manual_seed(0), torch.full((6,), 1.5, dtype=F64))
    stats = ClassStats.of(x, y, 3)
    assert gaussian_temperature(stats, *lda_head(stats)) == pytest.approx(1.0, rel=0.2)


def test_calibrated_head_keeps_every_prediction_and_lowers_the_loss() -> None:
    # the discriminative axis carries most of the variance: the shrunk covariance (mostly the
    # mean eigenvalue times I) underestimates it about 4x, so LDA's logits are overconfident
    spread = torch.tensor([2.0] + [0.3] * 7, dtype=F64)
    x, y = _classes(torch.Generator().manual_seed(1), spread)
    stats = ClassStats.of(x, y, 3)
    raw_w, raw_b = lda_head(stats)
    client = ClientStats("a", stats, stats, {})
    weight, bias = heads_from_clients([client])["a"]
    raw, calibrated = x @ raw_w.T + raw_b, x @ weight.T + bias
    assert torch.equal(raw.argmax(1), calibrated.argmax(1))
    scale = float(weight.norm() / raw_w.norm())
    assert 0.05 < scale < 0.6
    assert torch.allclose(bias, raw_b * scale)
    ce = torch.nn.functional.cross_entropy
    assert float(ce(calibrated, y)) < 0.8 * float(ce(raw, y))


def test_temperature_is_deterministic() -> None:
    x, y = _classes(torch.Generator().manual_seed(2), torch.full((4,), 1.0, dtype=F64))
    stats = ClassStats.of(x, y, 3)
    head = lda_head(stats)
    assert gaussian_temperature(stats, *head) == gaussian_temperature(stats, *head)


def test_an_indefinite_covariance_keeps_lda_scale_and_says_so(caplog) -> None:
    # a Gram smaller than the class means allow: within-class covariance negative definite
    stats = ClassStats(
        torch.eye(2, dtype=F64) * 0.1,
        torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=F64),
        torch.tensor([2.0, 2.0], dtype=F64),
    )
    head = (torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64))
    assert gaussian_temperature(stats, *head) == 1.0
    assert "not positive definite" in caplog.text
