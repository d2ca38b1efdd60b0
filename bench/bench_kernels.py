"""Fused multi-branch adapter on CPU: fused PyTorch path vs the unfused module composition.

Run:  .venv/bin/python bench/bench_kernels.py            (writes bench/results/kernels.json)
      .venv/bin/python bench/bench_kernels.py --quick    (small repeat counts, smoke run)
      .venv/bin/python -m pytest -q bench/bench_kernels.py --benchmark-enable   (pytest-benchmark)

Shapes (issue 4): T in {512, 4096} tokens, d = 384 and 768, r = 32, 3 branches, fp32, CPU,
per-layer alpha (the default gate), with the residual add. Variants, same parameters:
- `unfused`: what a user writes with nn modules: nn.Linear(d, r) -> nn.GELU -> one
  nn.Linear(r, r) per branch -> alpha-weighted sum (+ z) -> nn.Linear(r, d) -> * scale -> + residual;
- `fused`:   edgetune.kernels.fused_adapter (the CPU path, through the registered custom op);
- `bound`:   the bare GEMMs alone, no bias, no GELU, no residual: forward x@D and z@U;
  forward+backward adds g@U^T, u^T@g, x^T@dh, dh@D^T (6 GEMMs; the fused backward also
  recomputes x@D, so the bound is not reachable by design there: reported, no target).
Timing: every repeat runs every variant in turn (interleaved, so drift hits all alike) and the
headline numbers are ratios of medians from this one run, of per-call CPU time (torch on one
thread; see interleaved_medians), with wall-time medians and minima beside them. Peak memory of forward+backward is
the peak RSS increase of one step in a fresh interpreter (VmHWM reset via /proc/self/clear_refs
after a warm-up; MALLOC_MMAP_THRESHOLD_ pinned so freed tensors leave RSS at once).
When CUDA is present the Triton kernel is timed too, with triton.testing.do_bench, and its
achieved bandwidth is reported against the traffic model's bytes.

Traffic model (`--traffic`, no GPU needed; edgetune.kernels.traffic): bytes each Triton kernel
reads and writes for a shape, computed from the launchers' own plans (grids, tiles, splits),
beside the minimum (forward: x, residual, out; backward: x, g, dx), for the launch sizing of an
H200 (132 SMs) and a Jetson AGX Orin (16 SMs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

os.environ.setdefault("EDGETUNE_KERNEL", "torch")  # the CPU path, explicitly
from benchinfo import machine_info

from edgetune.kernels import fused_adapter

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(T, d) for d in (384, 768) for T in (512, 4096)]
RANK, BRANCHES, SCALE = 32, 3, 0.5
TARGETS = {"speedup_fwd": 1.5, "speedup_fwd_bwd": 1.5, "fused_over_bound_fwd": 1.3}  # every shape
HEADLINE = {"T": 4096, "d": 384, "speedup_fwd_bwd": 1.5}  # issue 18's CPU acceptance shape
TRAFFIC_SHAPES = [  # (T, d, r, branches, dtype)
    *((4096, 4096, r, 3, torch.bfloat16) for r in (16, 32, 64, 128)),
    (16384, 8192, 16, 3, torch.bfloat16),
    (4096, 768, 16, 3, torch.float16),
    (4096, 384, 32, 3, torch.float32),
]
GPU_PROGRAMS = {"H200 (132 SMs)": 4 * 132, "AGX Orin (16 SMs)": 4 * 16}  # 4 programs per SM
TRAFFIC_TARGET = {"bwd_ratio": 1.5}  # at T = 4096, d = 4096, r = 16 (issue 18)


class UnfusedAdapter(nn.Module):
    """The baseline composition, written plainly with nn modules."""

    def __init__(self, d: int, r: int, n: int, scale: float) -> None:
        super().__init__()
        self.down, self.act = nn.Linear(d, r), nn.GELU()
        self.branches = nn.ModuleList(nn.Linear(r, r) for _ in range(n))
        self.up = nn.Linear(r, d)
        self.alpha_logits = nn.Parameter(torch.zeros(n))
        self.scale = scale

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        z = self.act(self.down(x))
        alpha = torch.softmax(self.alpha_logits, -1)
        u = z
        for b, branch in enumerate(self.branches):
            u = u + alpha[b] * branch(z)
        return residual + self.scale * self.up(u)


class FusedAdapter(nn.Module):
    """Same parameters in the op's layout, one fused_adapter call."""

    def __init__(self, ref: UnfusedAdapter) -> None:
        super().__init__()
        self.D = nn.Parameter(ref.down.weight.detach().t().contiguous())
        self.b_D = nn.Parameter(ref.down.bias.detach().clone())
        self.C = nn.Parameter(torch.stack([b.weight.detach().t() for b in ref.branches]))
        self.q = nn.Parameter(torch.stack([b.bias.detach() for b in ref.branches]))
        self.U = nn.Parameter(ref.up.weight.detach().t().contiguous())
        self.b_U = nn.Parameter(ref.up.bias.detach().clone())
        self.alpha_logits = nn.Parameter(ref.alpha_logits.detach().clone())
        self.scale = ref.scale

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        alpha = torch.softmax(self.alpha_logits, -1)
        return fused_adapter(
            x, self.D, self.b_D, self.C, self.q, alpha, self.U, self.b_U, self.scale, residual
        )


def make_case(T: int, d: int, seed: int = 0) -> dict[str, Any]:
    """Both modules (U, C != 0 so no work is trivially skippable) and the step's tensors."""
    torch.manual_seed(seed)
    unfused = UnfusedAdapter(d, RANK, BRANCHES, SCALE)
    with torch.no_grad():
        unfused.alpha_logits.normal_()
    fused = FusedAdapter(unfused)
    x, res, g = torch.randn(T, d), torch.randn(T, d), torch.randn(T, d)
    z, u = torch.randn(T, RANK), torch.randn(T, RANK)
    return {
        "unfused": unfused,
        "fused": fused,
        "x": x,
        "res": res,
        "g": g,
        "z": z,
        "u": u,
        "x_leaf": x.clone().requires_grad_(),
        "res_leaf": res.clone().requires_grad_(),
    }


def clear_grads(c: dict[str, Any]) -> None:
    """Drop every gradient of both modules and of the leaf inputs (so each step allocates)."""
    for t in (*c["unfused"].parameters(), *c["fused"].parameters(), c["x_leaf"], c["res_leaf"]):
        t.grad = None


def forward_fns(c: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    D, U, x, z = c["fused"].D.detach(), c["fused"].U.detach(), c["x"], c["z"]

    def bound() -> None:
        torch.mm(x, D)
        torch.mm(z, U)

    def run(mod: nn.Module) -> Callable[[], Any]:
        def f() -> Tensor:
            with torch.no_grad():
                return mod(x, c["res"])

        return f

    return {"unfused": run(c["unfused"]), "fused": run(c["fused"]), "bound": bound}


def step_fns(c: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """Forward+backward; x and the residual need gradients (an adapter above the lowest)."""
    D, U = c["fused"].D.detach(), c["fused"].U.detach()
    x, z, u, g = c["x"], c["z"], c["u"], c["g"]

    def bound() -> None:
        torch.mm(x, D), torch.mm(z, U)  # forward
        dh = torch.mm(g, U.t())  # stands in for du -> dh (same shape, same GEMM)
        torch.mm(u.t(), g), torch.mm(x.t(), dh), torch.mm(dh, D.t())

    def run(mod: nn.Module) -> Callable[[], Any]:
        xs, rs = c["x_leaf"], c["res_leaf"]

        def f() -> None:
            clear_grads(c)
            mod(xs, rs).backward(g)

        return f

    return {"unfused": run(c["unfused"]), "fused": run(c["fused"]), "bound": bound}


def check_same_math(c: dict[str, Any]) -> float:
    """The two modules compute the same function (guards the baseline and the fused op)."""
    with torch.no_grad():
        a, b = c["unfused"](c["x"], c["res"]), c["fused"](c["x"], c["res"])
    err = (a - b).abs().max().item()
    assert err < 1e-4, err
    return err


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], repeats: int, block_s: float
) -> dict[str, dict[str, float]]:
    """Per variant: median CPU seconds, median wall seconds and min wall seconds per call.

    Repeats interleave the variants; each repeat runs every variant for about `block_s`
    seconds (at least 3 calls). CPU time (time.process_time, torch on one thread) is the
    headline: on a shared machine wall time also counts the time other processes hold the
    core, which hits whichever variant happens to run then; CPU time does not (cache and
    memory-bandwidth contention still show). Wall medians are reported beside it.
    """
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up
        t0 = time.perf_counter()
        fn()
        calls[name] = max(3, min(200, round(block_s / (time.perf_counter() - t0))))
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(calls[name]):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - t0)
    return {
        "cpu": {k: statistics.median(v) for k, v in cpu.items()},
        "wall": {k: statistics.median(v) for k, v in wall.items()},
        "wall_min": {k: min(v) for k, v in wall.items()},
    }


def peak_step_memory(variant: str, T: int, d: int) -> int:
    """Peak RSS increase (bytes) of one forward+backward of `variant`, in a fresh interpreter."""
    code = (
        "import sys; sys.path.insert(0, 'bench'); import bench_kernels as b\n"
        f"c = b.make_case({T}, {d}); f = b.step_fns(c)['{variant}']; f()\n"
        "b.clear_grads(c); import gc; gc.collect()\n"
        "st = lambda k: int([l for l in open('/proc/self/status') if l.startswith(k)][0].split()[1])\n"
        "base = st('VmRSS'); open('/proc/self/clear_refs', 'w').write('5'); f()\n"
        "print((st('VmHWM') - base) * 1024)\n"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return int(proc.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    info = machine_info(["kernels", "bench/bench_kernels.py"])
    info["threads"] = torch.get_num_threads()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def cuda_triton_times(
    T: int, d: int, r: int = RANK, dtype: torch.dtype = torch.float32
) -> dict[str, float] | None:
    """Triton fwd / bwd in ms (do_bench) and GB/s of the traffic model's bytes; None on CPU."""
    if not torch.cuda.is_available():
        return None
    from triton.testing import do_bench

    from edgetune.kernels.traffic import step_traffic
    from edgetune.kernels.triton_path import triton_backward, triton_forward_saving

    f = FusedAdapter(UnfusedAdapter(d, r, BRANCHES, SCALE)).cuda()
    x, res, g = (torch.randn(T, d, device="cuda", dtype=dtype) for _ in range(3))
    args = [p.detach() for p in (f.D, f.b_D, f.C, f.q)]
    args += [torch.softmax(f.alpha_logits.detach(), -1), f.U.detach(), f.b_U.detach()]
    saved = triton_forward_saving(x, *args, SCALE, res)[1]
    fwd = do_bench(lambda: triton_forward_saving(x, *args, SCALE, res))
    bwd = do_bench(lambda: triton_backward(g, x, *args, SCALE, saved=saved))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    model = step_traffic(T, d, r, BRANCHES, dtype, 4 * sms)
    return {
        "triton_fwd_ms": fwd,
        "triton_bwd_ms": bwd,
        "triton_fwd_bwd_ms": fwd + bwd,
        "fwd_GBps_model_bytes": model["fwd_bytes"] / fwd / 1e6,
        "bwd_GBps_model_bytes": model["bwd_bytes"] / bwd / 1e6,
        "fwd_GBps_min_bytes": model["fwd_min"] / fwd / 1e6,
        "bwd_GBps_min_bytes": model["bwd_min"] / bwd / 1e6,
    }


def traffic_table() -> list[dict[str, Any]]:
    """The traffic model of a training step for every TRAFFIC_SHAPES entry and GPU sizing."""
    from edgetune.kernels.traffic import step_traffic

    rows = []
    for (T, d, r, n, dt), (gpu, programs) in product(TRAFFIC_SHAPES, GPU_PROGRAMS.items()):
        row = step_traffic(T, d, r, n, dt, programs)
        cold = step_traffic(T, d, r, n, dt, programs, l2_bytes=0)  # no L2 reuse at all
        row |= {
            "gpu": gpu,
            "fwd_ratio_no_l2": cold["fwd_ratio"],
            "bwd_ratio_no_l2": cold["bwd_ratio"],
        }
        rows.append(row)
        print(
            f"traffic T={T} d={d} r={r} {row['dtype']} {gpu}: fwd {row['fwd_bytes'] / 1e6:.1f} MB"
            f" ({row['fwd_ratio']:.2f}x min, {cold['fwd_ratio']:.2f}x without L2 reuse),"
            f" bwd {row['bwd_bytes'] / 1e6:.1f} MB ({row['bwd_ratio']:.2f}x min,"
            f" {cold['bwd_ratio']:.2f}x without L2 reuse), partials"
            f" {row['partial_bytes'] / 1e6:.2f} MB",
            flush=True,
        )
    return rows


def run_table(repeats: int, block_s: float) -> list[dict[str, Any]]:
    rows = []
    for T, d in SHAPES:
        c = make_case(T, d)
        err = check_same_math(c)
        t_fwd = interleaved_medians(forward_fns(c), repeats, block_s)
        t_step = interleaved_medians(step_fns(c), repeats, block_s)
        fwd, step = t_fwd["cpu"], t_step["cpu"]
        mem = {v: peak_step_memory(v, T, d) for v in ("unfused", "fused")}
        row = {
            "T": T,
            "d": d,
            "r": RANK,
            "branches": BRANCHES,
            "max_abs_diff": err,
            "fwd_ms": {k: v * 1e3 for k, v in fwd.items()},  # median CPU time per call
            "fwd_bwd_ms": {k: v * 1e3 for k, v in step.items()},
            "speedup_fwd": fwd["unfused"] / fwd["fused"],
            "speedup_fwd_bwd": step["unfused"] / step["fused"],
            "fused_over_bound_fwd": fwd["fused"] / fwd["bound"],
            "fused_over_bound_fwd_bwd": step["fused"] / step["bound"],
            "wall_ms": {
                kind: {k: v * 1e3 for k, v in t["wall"].items()}
                for kind, t in (("fwd", t_fwd), ("fwd_bwd", t_step))
            },
            "wall_min_ms": {
                kind: {k: v * 1e3 for k, v in t["wall_min"].items()}
                for kind, t in (("fwd", t_fwd), ("fwd_bwd", t_step))
            },
            "wall_speedup_fwd": t_fwd["wall"]["unfused"] / t_fwd["wall"]["fused"],
            "wall_speedup_fwd_bwd": t_step["wall"]["unfused"] / t_step["wall"]["fused"],
            "wall_fused_over_bound_fwd": t_fwd["wall"]["fused"] / t_fwd["wall"]["bound"],
            "peak_step_bytes": mem,
            "peak_ratio_fused_over_unfused": mem["fused"] / mem["unfused"],
            "cuda": cuda_triton_times(T, d),
        }
        rows.append(row)
        print(
            f"T={T:5d} d={d}: fwd x{row['speedup_fwd']:.2f}  fwd+bwd x{row['speedup_fwd_bwd']:.2f}"
            f"  fused/bound fwd {row['fused_over_bound_fwd']:.2f}"
            f"  fwd+bwd {row['fused_over_bound_fwd_bwd']:.2f}"
            f"  peak mem fused/unfused {row['peak_ratio_fused_over_unfused']:.2f}",
            flush=True,
        )
    return rows


def _headline(rows: list[dict]) -> dict:
    """Forward+backward speedup at issue 18's acceptance shape, and whether it meets 1.5x."""
    (row,) = [r for r in rows if (r["T"], r["d"]) == (HEADLINE["T"], HEADLINE["d"])] or [{}]
    speedup = row.get("speedup_fwd_bwd")
    met = speedup is not None and speedup >= HEADLINE["speedup_fwd_bwd"]
    return {**HEADLINE, "measured": speedup, "met": met}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable)")
    p.add_argument(
        "--repeats", type=int, default=11, help="interleaved repeats (more on a busy box)"
    )
    p.add_argument("--out", default=str(ROOT / "bench/results/kernels.json"))
    p.add_argument("--traffic", action="store_true", help="only the traffic model (no timing)")
    args = p.parse_args(argv)
    if args.traffic:
        rows = traffic_table()
        out = Path(args.out).with_name("kernels_traffic.json")
        out.write_text(json.dumps({"benchmark": "kernels_traffic", "machine": machine(),
                                   "target": TRAFFIC_TARGET, "rows": rows}, indent=1))  # fmt: skip
        print(f"wrote {out}")
        return 0
    torch.set_num_threads(args.threads)
    repeats, block_s = (2, 0.01) if args.quick else (args.repeats, 0.05)
    started = time.time()
    info = machine()
    rows = run_table(repeats, block_s)
    result = {
        "benchmark": "kernels",
        "machine": info,
        "started": started,
        "config": {
            "shapes": SHAPES,
            "r": RANK,
            "branches": BRANCHES,
            "dtype": "float32",
            "alpha": "per-layer",
            "residual": True,
            "scale": SCALE,
            "repeats": repeats,
            "seconds_per_variant_per_repeat": block_s,
            "path": "torch (CPU)",
            "quick": args.quick,
        },
        "targets": TARGETS,
        "rows": rows,
        "targets_met": {
            k: all((r[k] >= v) if k.startswith("speedup") else (r[k] <= v) for r in rows)
            for k, v in TARGETS.items()
        },
        "headline": _headline(rows),
        "seconds": time.time() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}; targets met on every shape: {result['targets_met']}; "
          f"headline: {result['headline']}")  # fmt: skip
    return 0


# ------------------------------------------------------------------ pytest-benchmark entry points


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"T{s[0]}-d{s[1]}")
def case(request: pytest.FixtureRequest) -> dict[str, Any]:
    return make_case(*request.param)


@pytest.mark.parametrize("variant", ["unfused", "fused", "bound"])
def test_forward(benchmark: Any, case: dict[str, Any], variant: str) -> None:
    check_same_math(case)
    benchmark(forward_fns(case)[variant])


@pytest.mark.parametrize("variant", ["unfused", "fused", "bound"])
def test_forward_backward(benchmark: Any, case: dict[str, Any], variant: str) -> None:
    benchmark(step_fns(case)[variant])


if __name__ == "__main__":
    sys.exit(main())
