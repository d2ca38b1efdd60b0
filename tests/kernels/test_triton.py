"""Triton launchers (interpreted on CPU): validation, determinism, multi-tile grids, AOT builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import SCALE, Case, make_inputs

from edgetune.kernels import reference_adapter, triton_path
from edgetune.kernels.aot import SHARED_LIMIT, launch_configs
from edgetune.kernels.triton_path import (
    RANK_BUCKETS,
    bwd_config,
    fwd_config,
    rank_bucket,
    triton_backward,
    triton_forward,
)

PARAMS = ("x", "D", "b_D", "C", "q", "alpha", "U", "b_U")
pytestmark = pytest.mark.skipif(not triton_path.INTERPRETED, reason="needs TRITON_INTERPRET=1")


def _args(case: Case, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    inp = make_inputs(case)
    return [inp[k].to(dtype) for k in PARAMS]


@pytest.mark.parametrize(
    ("r", "bucket"), [(1, 16), (4, 16), (16, 16), (17, 32), (24, 32), (33, 64), (128, 128)]
)
def test_rank_bucket_pads_to_at_least_16(r: int, bucket: int) -> None:
    assert rank_bucket(r) == bucket
    for cfg in (fwd_config(r), bwd_config(r)):
        assert min(cfg.block_t, cfg.block_k, cfg.block_n, cfg.r_pad) >= 16  # GPU tl.dot minimum


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"r": 129}, ValueError, "rank 129"),
        ({"n": 9}, ValueError, "9 branches"),
        ({"alpha": (4, 2)}, ValueError, "alpha shape"),
        ({"dtype_of": "U"}, TypeError, "parameters must be float"),
        ({"U_shape": (8, 7)}, ValueError, "U has shape"),
    ],
)
def test_launcher_rejects_bad_shapes(change: dict, error: type, match: str) -> None:
    T, K, r, n, N = 5, 16, change.get("r", 8), change.get("n", 2), 12
    a = [torch.randn(T, K), torch.randn(K, r), torch.zeros(r), torch.zeros(n, r, r)]
    a += [
        torch.zeros(n, r),
        torch.ones(change.get("alpha", (n,))),
        torch.zeros(*change.get("U_shape", (r, N))),
    ]
    a += [torch.zeros(N)]
    if "dtype_of" in change:
        a[PARAMS.index(change["dtype_of"])] = a[PARAMS.index(change["dtype_of"])].long()
    with pytest.raises(error, match=match):
        triton_forward(*a, SCALE)


def test_cpu_tensors_rejected_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_path, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        triton_forward(*_args(Case(3, 16, 4, 1, False, False, torch.float32)), SCALE)


def test_empty_batch() -> None:
    args = _args(Case(1, 16, 4, 2, False, False, torch.float32))
    args[0] = args[0][:0]
    assert triton_forward(*args, SCALE).shape == (0, 16)
    grads = triton_backward(torch.zeros(0, 16), *args, SCALE)
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


def test_backward_is_deterministic_and_handles_several_tiles_per_program() -> None:
    """T=70 with 32-row tiles: 3 tiles; 1 program walks all three, 2 programs split them."""
    case = Case(70, 24, 8, 3, True, False, torch.float32, d_out=20)
    inp = make_inputs(case)
    args = [inp[k].float() for k in PARAMS]
    g = inp["grad"].float()
    leaves = [inp[k].clone().requires_grad_() for k in PARAMS]
    reference_adapter(*leaves, SCALE).backward(inp["grad"])
    for programs in (1, 2):
        first = triton_backward(g, *args, SCALE, max_programs=programs)
        again = triton_backward(g, *args, SCALE, max_programs=programs)
        for name, a, b, leaf in zip(PARAMS, first, again, leaves):
            assert torch.equal(a, b), f"{name} not bitwise reproducible"  # no atomics
            torch.testing.assert_close(a.double(), leaf.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_forward_matches_reference_on_several_row_tiles() -> None:
    case = Case(130, 40, 24, 2, True, True, torch.float16, d_out=70)  # 3 fwd tiles, 2 N blocks
    inp = make_inputs(case)
    out = triton_forward(*(inp[k].half() for k in PARAMS), SCALE, inp["residual"].half())
    want = reference_adapter(*(inp[k] for k in PARAMS), SCALE, inp["residual"])
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------ AOT


def test_launch_configs_cover_what_the_launchers_pick() -> None:
    configs = launch_configs()
    assert len(configs) == 2 * 3 * len(RANK_BUCKETS)
    picked = {rank_bucket(r) for r in range(1, 129)}
    assert picked == set(RANK_BUCKETS)


@pytest.mark.slow  # cold only; see docstring. Runs in the default suite all the same.
def test_aot_compiles_every_config_for_sm87_sm89_sm90(tmp_path: Path) -> None:
    """Real GPU lowering (ttir -> cubin with the ptxas bundled in triton), no GPU needed.

    Runs in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be lowered).
    Cold: ~3 CPU-minutes for the 72 builds (fp32 IEEE dots unroll into large FMA code), i.e.
    1.5-4.5 min wall on 2 shared cores; warm (triton's on-disk cache, reused until the kernel
    source or triton changes): ~2 s.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "aot.json"
    cmd = [sys.executable, "-m", "edgetune.kernels.aot", "--json", str(out), "--workers", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    built = {(r["kernel"], r["dtype"], r["r_pad"], r["cap"]) for r in rows}
    want = {(*c, cap) for c in launch_configs() for cap in (87, 89, 90)}
    assert built == want
    for r in rows:
        assert r["cubin_bytes"] > 0, r
        assert 0 <= r["shared"] <= SHARED_LIMIT[r["cap"]], r


def test_triton_autograd_function_matches_reference() -> None:
    """The Triton path's own autograd.Function (direct use, e.g. GPU benchmarks)."""
    case = Case(21, 24, 8, 2, True, True, torch.float32, d_out=19)
    inp = make_inputs(case)
    mine = [inp[k].float().requires_grad_() for k in (*PARAMS, "residual")]
    ref = [inp[k].clone().requires_grad_() for k in (*PARAMS, "residual")]
    out = triton_path.TritonFusedAdapter.apply(*mine[:8], SCALE, mine[8])
    out.backward(inp["grad"].float())
    reference_adapter(*ref[:8], SCALE, ref[8]).backward(inp["grad"])
    want = reference_adapter(*ref[:8], SCALE, ref[8])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)
