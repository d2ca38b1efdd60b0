"""Aggregation math with hand-computed expectations (DESIGN.md section 4 and its baselines)."""

from __future__ import annotations

import pytest
import torch

from edgetune.strategies.aggregation import (
    ClientUpdate,
    balanced_weights,
    factored_svd,
    fedadapter,
    fedavg,
    flexlora,
    flora,
    hetlora,
    project_conflicts,
    truncate_lora,
    weighted_average,
)


def upd(cid: str, fam: str, n: int, **tensors: list[float]) -> ClientUpdate:
    named = {k.replace("__", "."): torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    return ClientUpdate(client_id=cid, family=fam, num_samples=n, tensors=named)


def test_weighted_average_hand_computed() -> None:
    out = weighted_average(
        [{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([4.0, 8.0])}], [1, 2]
    )
    assert torch.allclose(out["x"], torch.tensor([3.0, 6.0]))


def test_fedadapter_two_families_hand_computed() -> None:
    # family a: n = 1, 3 -> dbar_a = (1*[4] + 3*[0]) / 4 = [1]; family values FedAvg'd likewise
    # family b: n = 4     -> dbar_b = [-2]
    # beta = 0 -> pi = 1/2 each; eta = 0.5 -> C = 10 + 0.5 * (0.5*1 + 0.5*-2) = 9.75
    ups = [
        upd("c1", "a", 1, global__anchor1__C=[4.0], family__layer0__D=[8.0]),
        upd("c2", "a", 3, global__anchor1__C=[0.0], family__layer0__D=[0.0]),
        upd("c3", "b", 4, global__anchor1__C=[-2.0], family__layer0__D=[5.0]),
    ]
    res = fedadapter({"global.anchor1.C": torch.tensor([10.0])}, ups, beta=0.0, eta=0.5)
    assert res.weights == {"a": 0.5, "b": 0.5}
    assert torch.allclose(res.global_params["global.anchor1.C"], torch.tensor([9.75]))
    assert torch.allclose(res.families["a"]["family.layer0.D"], torch.tensor([2.0]))
    assert torch.allclose(res.families["b"]["family.layer0.D"], torch.tensor([5.0]))
    # beta = 1: pi = N_m / N = 4/8 each here too, but with 1 and 7 samples it changes:
    assert balanced_weights({"a": 1, "b": 3}, 1.0) == {"a": 0.25, "b": 0.75}
    assert balanced_weights({"a": 1, "b": 4}, 0.5) == pytest.approx({"a": 1 / 3, "b": 2 / 3})


def test_degenerate_one_family_beta1_no_projection_is_fedavg() -> None:
    g0 = {"global.anchor1.C": torch.randn(4, 4), "global.anchor1.q": torch.randn(4)}
    ups = []
    for i, n in enumerate([3, 5, 11]):
        deltas = {k: torch.randn_like(v) for k, v in g0.items()}
        ups.append(ClientUpdate(f"c{i}", "only", n, {**deltas, "family.head.bias": torch.randn(2)}))
    res = fedadapter(g0, ups, beta=1.0, eta=1.0, project=False)
    # plain FedAvg of the clients' post-training *values* C + delta_c
    values = [
        ClientUpdate(u.client_id, u.family, u.num_samples, {k: g0[k] + u.tensors[k] for k in g0})
        for u in ups
    ]
    expected = fedavg(values)
    for k in g0:
        torch.testing.assert_close(res.global_params[k], expected[k], rtol=1e-6, atol=1e-6)


def test_beta1_no_projection_many_families_is_fedavg_over_all_clients() -> None:
    g0 = {"global.anchor1.C": torch.zeros(3, 3)}
    ups = [
        ClientUpdate(f"c{i}", f"f{i % 3}", i + 1, {"global.anchor1.C": torch.randn(3, 3)})
        for i in range(7)
    ]
    res = fedadapter(g0, ups, beta=1.0)
    torch.testing.assert_close(
        res.global_params["global.anchor1.C"], fedavg(ups)["global.anchor1.C"]
    )


def test_projection_off_merge_is_linear_in_client_deltas() -> None:
    g0 = {"global.anchor1.C": torch.zeros(2, 2)}
    fams = ["a", "a", "b", "c"]
    ns = [2, 5, 3, 7]
    x = [torch.randn(2, 2) for _ in fams]
    y = [torch.randn(2, 2) for _ in fams]

    def run(ts: list[torch.Tensor]) -> torch.Tensor:
        ups = [
            ClientUpdate(f"c{i}", f, n, {"global.anchor1.C": t})
            for i, (f, n, t) in enumerate(zip(fams, ns, ts))
        ]
        return fedadapter(g0, ups, beta=0.3, eta=0.7, project=False).global_params[
            "global.anchor1.C"
        ]

    a, b = 2.0, -3.0
    combined = run([a * xi + b * yi for xi, yi in zip(x, y)])
    torch.testing.assert_close(combined, a * run(x) + b * run(y), rtol=1e-5, atol=1e-5)


def test_projection_hand_computed() -> None:
    # dbar_a = [1, 0], dbar_b = [-1, 1]: <a, b> = -1 < 0
    # d_a = a - (-1 / 2) * b = [0.5, 0.5]; d_b = b - (-1 / 1) * a = [0, 1]
    deltas = {"a": {"g": torch.tensor([1.0, 0.0])}, "b": {"g": torch.tensor([-1.0, 1.0])}}
    out = project_conflicts(deltas, seed=0)
    torch.testing.assert_close(out["a"]["g"], torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(out["b"]["g"], torch.tensor([0.0, 1.0], dtype=torch.float64))
    # no conflict -> unchanged
    same = project_conflicts(
        {"a": {"g": torch.tensor([1.0, 0.0])}, "b": {"g": torch.tensor([1.0, 1.0])}}, 0
    )
    torch.testing.assert_close(same["a"]["g"], torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_fedadapter_projection_changes_merge_and_is_seeded() -> None:
    g0 = {"global.anchor1.C": torch.zeros(2)}
    ups = [
        ClientUpdate("c1", "a", 1, {"global.anchor1.C": torch.tensor([1.0, 0.0])}),
        ClientUpdate("c2", "b", 1, {"global.anchor1.C": torch.tensor([-1.0, 1.0])}),
    ]
    res = fedadapter(g0, ups, beta=0.0, eta=1.0, project=True, seed=7)
    torch.testing.assert_close(res.global_params["global.anchor1.C"], torch.tensor([0.25, 0.75]))
    again = fedadapter(g0, ups, beta=0.0, eta=1.0, project=True, seed=7)
    assert torch.equal(
        res.global_params["global.anchor1.C"], again.global_params["global.anchor1.C"]
    )


def lora_update(cid: str, n: int, r: int, d_in: int = 6, d_out: int = 5) -> ClientUpdate:
    t = {"lora.q.A": torch.randn(r, d_in), "lora.q.B": torch.randn(d_out, r)}
    return ClientUpdate(cid, "fam", n, t)


def test_hetlora_zero_pads_averages_and_truncates() -> None:
    u1 = ClientUpdate(
        "c1",
        "f",
        1,
        {"lora.m.A": torch.tensor([[1.0, 1.0]]), "lora.m.B": torch.tensor([[2.0], [2.0]])},
    )
    u2 = ClientUpdate(
        "c2",
        "f",
        3,
        {
            "lora.m.A": torch.tensor([[3.0, 3.0], [4.0, 4.0]]),
            "lora.m.B": torch.tensor([[6.0, 8.0], [6.0, 8.0]]),
        },
    )
    out = hetlora([u1, u2])
    # A row 0: (1*1 + 3*3)/4 = 2.5; row 1: (1*0 + 3*4)/4 = 3
    torch.testing.assert_close(out["lora.m.A"], torch.tensor([[2.5, 2.5], [3.0, 3.0]]))
    torch.testing.assert_close(out["lora.m.B"], torch.tensor([[5.0, 6.0], [5.0, 6.0]]))
    small = truncate_lora(out, 1)
    assert small["lora.m.A"].shape == (1, 2) and small["lora.m.B"].shape == (2, 1)
    torch.testing.assert_close(small["lora.m.A"], torch.tensor([[2.5, 2.5]]))


def test_flexlora_matches_dense_truncated_svd() -> None:
    ups = [lora_update("c1", 2, 2), lora_update("c2", 1, 3), lora_update("c3", 5, 4)]
    ws = torch.tensor([2.0, 1.0, 5.0], dtype=torch.float64) / 8
    dense = sum(
        w * u.tensors["lora.q.B"].double() @ u.tensors["lora.q.A"].double() for w, u in zip(ws, ups)
    )
    out = flexlora(ups)
    assert out["lora.q.A"].shape == (4, 6) and out["lora.q.B"].shape == (5, 4)
    u, s, vh = torch.linalg.svd(dense)
    for r in (2, 3, 4):
        t = truncate_lora(out, r)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        torch.testing.assert_close(
            (t["lora.q.B"] @ t["lora.q.A"]).double(), best, rtol=1e-4, atol=1e-5
        )


def test_factored_svd_reconstructs_without_dense_product() -> None:
    b, a = torch.randn(40, 7, dtype=torch.float64), torch.randn(7, 30, dtype=torch.float64)
    u, s, vh = factored_svd(b, a)
    assert u.shape == (40, 7) and vh.shape == (7, 30)
    torch.testing.assert_close((u * s) @ vh, b @ a)


def test_flora_stacking_is_exact_weighted_sum() -> None:
    ups = [lora_update("c1", 1, 2), lora_update("c2", 3, 3)]
    out = flora(ups)
    assert out["lora.q.A"].shape == (5, 6) and out["lora.q.B"].shape == (5, 5)
    expected = 0.25 * ups[0].tensors["lora.q.B"] @ ups[0].tensors["lora.q.A"]
    expected += 0.75 * ups[1].tensors["lora.q.B"] @ ups[1].tensors["lora.q.A"]
    torch.testing.assert_close(out["lora.q.B"] @ out["lora.q.A"], expected, rtol=1e-5, atol=1e-5)


def test_fedavg_homogeneous_hand_computed() -> None:
    ups = [upd("c1", "f", 1, lora__m__A=[0.0, 4.0]), upd("c2", "f", 1, lora__m__A=[2.0, 0.0])]
    torch.testing.assert_close(fedavg(ups)["lora.m.A"], torch.tensor([1.0, 2.0]))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="beta"):
        balanced_weights({"a": 1}, 1.5)
    with pytest.raises(ValueError, match="at least one"):
        fedadapter({}, [])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average([{"x": torch.zeros(1)}], [0])
