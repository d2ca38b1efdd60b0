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

from edgetune.kernels import fused_adapter, reference_adapter, triton_path
from edgetune.kernels.aot import SHARED_LIMIT, _variant, plan_launches
from edgetune.kernels.triton_path import (
    KERNELS,
    RANK_BUCKETS,
    SCRATCH_RATIO,
    backward_plan,
    kernel_config,
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
    assert {rank_bucket(r) for r in range(1, 129)} == set(RANK_BUCKETS)  # what aot.py builds
    for kernel in KERNELS:
        blocks = [v for k, v in kernel_config(kernel, r).items() if k.startswith(("BLOCK", "R_"))]
        assert min(blocks) >= 16, kernel  # GPU tl.dot minimum


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
    """T=70 with 32-row tiles: 3 tiles. max_programs 1: one program per split walks all three;
    2: the strip kernels split the tokens in two chunks; 6: the branch kernel too (n = 3)."""
    case = Case(70, 24, 8, 3, True, False, torch.float32, d_out=20)
    inp = make_inputs(case)
    args = [inp[k].float() for k in PARAMS]
    g = inp["grad"].float()
    leaves = [inp[k].clone().requires_grad_() for k in PARAMS]
    reference_adapter(*leaves, SCALE).backward(inp["grad"])
    for programs in (1, 2, 6):
        first = triton_backward(g, *args, SCALE, max_programs=programs)
        again = triton_backward(g, *args, SCALE, max_programs=programs)
        for name, a, b, leaf in zip(PARAMS, first, again, leaves):
            assert torch.equal(a, b), f"{name} not bitwise reproducible"  # no atomics
            torch.testing.assert_close(a.double(), leaf.grad, rtol=1e-4, atol=1e-5, msg=name)


# every shape of the accuracy table and its odd extras, plus layer shapes of real models
SCRATCH_SHAPES = [
    (T, d, r, n, d_out)
    for T in (1, 7, 64)
    for d in (16, 40, 96)
    for r in (4, 8, 16, 24)
    for n in (1, 2, 3)
    for d_out in (d,)
] + [(13, 37, 1, 5, 11), (67, 29, 23, 2, 71), (5, 130, 31, 8, 3), (33, 40, 24, 3, 17)]
SCRATCH_SHAPES += [(4096, 4096, 16, 3, 4096), (4096, 384, 32, 3, 384), (65536, 8192, 64, 3, 8192)]
SCRATCH_SHAPES += [(4096, 4096, 128, 8, 4096), (512, 16, 128, 8, 16), (1 << 20, 768, 16, 3, 768)]


@pytest.mark.parametrize("max_programs", [4, 528])  # interpreter; an H200 (132 SMs x 4)
def test_backward_scratch_is_bounded(max_programs: int) -> None:
    """The launcher's fp32 partial buffers stay <= SCRATCH_RATIO x the weight gradients.

    Planned on meta tensors (the launcher allocates, launches nothing), so big shapes are free.
    """
    for T, d, r, n, d_out in SCRATCH_SHAPES:
        for per_token in (False, True):
            shapes = [(d, r), (r,), (n, r, r), (n, r), (T, n) if per_token else (n,)]
            shapes += [(r, d_out), (d_out,)]
            params = [torch.empty(s, device="meta") for s in shapes]
            x, g = torch.empty(T, d, device="meta"), torch.empty(T, d_out, device="meta")
            plan = backward_plan(g, x, *params, SCALE, max_programs=max_programs)
            scratch = sum(p.numel() for p in plan.partials.values())
            weight_grads = sum(p.numel() for p in params[:4] + params[5:]) + (0 if per_token else n)
            assert scratch <= SCRATCH_RATIO * weight_grads, (T, d, r, n, d_out, per_token)


def test_forward_matches_reference_on_several_row_tiles() -> None:
    case = Case(130, 40, 24, 2, True, True, torch.float16, d_out=70)  # 3 fwd tiles, 2 N blocks
    inp = make_inputs(case)
    out = triton_forward(*(inp[k].half() for k in PARAMS), SCALE, inp["residual"].half())
    want = reference_adapter(*(inp[k] for k in PARAMS), SCALE, inp["residual"])
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------ AOT


def test_aot_plans_exactly_what_a_training_step_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record the launches of a real (interpreted) forward+backward through fused_adapter: the
    same kernels, flags and configurations are what aot.py compiles by default."""
    seen = set()
    run = triton_path.Launch.__call__

    def record(self: triton_path.Launch) -> None:
        seen.add((self.name, _variant(self.meta), repr(sorted(self.meta.items()))))
        run(self)

    monkeypatch.setattr(triton_path.Launch, "__call__", record)
    monkeypatch.setenv("EDGETUNE_KERNEL", "triton")
    case = Case(40, 32, 16, 3, False, True, torch.float16)
    inp = make_inputs(case)
    leaves = [inp[k].half().requires_grad_() for k in PARAMS]
    fused_adapter(*leaves, SCALE, inp["residual"].half()).backward(inp["grad"].half())
    planned = {
        (launch.name, _variant(launch.meta), repr(sorted(launch.meta.items())))
        for launch in plan_launches("fp16", 16)
    }
    assert seen == planned


@pytest.mark.slow  # cold only; see docstring. Runs in the default suite all the same.
def test_aot_launched_variants_compile_without_spills(tmp_path: Path) -> None:
    """Real GPU lowering (ttir -> cubin with the ptxas bundled in triton), no GPU needed: every
    launch of a training step, fp32/fp16/bf16, r <= 64, for sm_87 (Orin) and sm_90 (Hopper),
    0 spill bytes (cuobjdump STACK/LOCAL) and shared memory within the target's limit.

    Runs in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be lowered).
    Cold: ~110 builds, ~40 CPU-s (about 1 min wall on 2 shared cores); warm (triton's on-disk
    cache, reused until the kernel source or triton changes): a few seconds.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "aot.json"
    cmd = [sys.executable, "-m", "edgetune.kernels.aot", "--json", str(out), "--workers", "2"]
    cmd += ["--caps", "87", "90", "--ranks", "16", "32", "64"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {(r["dtype"], r["r_pad"], r["cap"]) for r in rows} == {
        (dt, rp, cap) for dt in ("fp32", "fp16", "bf16") for rp in (16, 32, 64) for cap in (87, 90)
    }
    assert {r["kernel"] for r in rows} == set(KERNELS)
    for r in rows:
        assert r["stack"] == 0 and r["local"] == 0, f"spills: {r}"
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
