"""Memory-traffic model of the Triton launches: bytes each kernel reads and writes for a shape.

Computed from the launch plans themselves (`triton_path.forward_plan` / `backward_plan` on
`meta` tensors: the same grids, block sizes and buffers the launchers use), so a change of
tiling or split shows up here. Model, per launch:
- streamed tensors ([T, K], [T, N], the rank-sized [T, R] intermediates) are counted once per
  program tile that loads them: a [T, R] tensor read by every column strip is counted once
  per strip (that is the real cost of splitting the width);
- a tensor read by many programs (parameters; a [T, R] intermediate read by every strip) is
  counted once per launch if it is below `l2_bytes` (default 1 MiB: it stays in L2, >= 4 MB on
  every target GPU, after the first touch), else once per reading program; `l2_bytes=0` gives
  the pessimistic no-reuse figure, which the benchmark reports beside it;
- fp32 partial slots are written once by their program and read once by the host reduction,
  which also writes the weight gradients (counted under "reduce").
Minimum (the issue's definition): forward reads x and the residual and writes out; backward
reads x and g and writes dx. Everything else is overhead reported against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .triton_path import Launch, backward_plan, forward_plan

L2_RESIDENT = 1 << 20  # bytes: tensors below this are counted once per launch


@dataclass
class KernelTraffic:
    kernel: str
    programs: int
    read: int
    written: int


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def launch_traffic(launch: Launch, l2_bytes: int = L2_RESIDENT) -> KernelTraffic:
    """(read, written) bytes of one planned launch (see the module docstring for the model)."""
    a, m, name = launch.args, launch.meta, launch.name

    def _streamed(t: Tensor, times: int = 1) -> int:
        """Bytes of a tensor read `times` times, or once if it stays in L2."""
        return _nbytes(t) * (1 if _nbytes(t) < l2_bytes else times)

    progs = 1
    for g in launch.grid:
        progs *= g
    if name == "rank_fwd":  # x, D, b_D, C, q, alpha -> (h), u
        read = sum(_streamed(t) for t in a[:6])
        written = _nbytes(a[7]) + (_nbytes(a[6]) if m["SAVE_H"] else 0)
    elif name == "up":  # u once per column tile; U, b_U; residual -> out
        read = _streamed(a[0], launch.grid[1]) + _streamed(a[1]) + _streamed(a[2])
        read += _nbytes(a[3]) if m["HAS_RES"] else 0
        written = _nbytes(a[4])
    elif name == "rank_bwd":  # (h | x, D), C, q, alpha, U, g -> u, z, du, dh (, dhd), dalpha
        read = _nbytes(a[8]) if m["HAS_H"] else _nbytes(a[0]) + _streamed(a[1])
        read += sum(_streamed(t) for t in a[3:7]) + _nbytes(a[7])
        outs = {id(t): t for t in a[9:15]}.values()  # dh and dhd may be one buffer
        written = sum(_nbytes(t) for t in outs)
    elif name == "branch":  # z, du once per branch; dh once; C, q, alpha -> partial slots
        n = launch.grid[1]
        read = n * (_nbytes(a[0]) + _nbytes(a[1])) + _nbytes(a[2])
        read += sum(_streamed(t) for t in a[3:6])
        written = sum(_nbytes(t) for t in a[6:10])
    elif name == "strip":  # A once per strip, B once (D^T strip per program) -> slots (, dx)
        read = _streamed(a[0], launch.grid[0]) + _nbytes(a[1])
        read += _streamed(a[2]) if m["WRITE_DX"] else 0
        written = _nbytes(a[4]) + (_nbytes(a[5]) if m["B_SUMS"] else 0)
        written += _nbytes(a[3]) if m["WRITE_DX"] else 0
    else:
        raise ValueError(f"no traffic model for kernel {name!r}")
    return KernelTraffic(name, progs, read, written)


def _inputs(T: int, d: int, r: int, n: int, dtype: torch.dtype, d_out: int | None = None):
    N = d_out or d
    meta = dict(device="meta")
    x = torch.empty(T, d, dtype=dtype, **meta)
    params = [torch.empty(s, dtype=torch.float32, **meta) for s in
              [(d, r), (r,), (n, r, r), (n, r), (n,), (r, N), (N,)]]  # fmt: skip
    return x, params, torch.empty(T, N, dtype=dtype, **meta)


def step_traffic(
    T: int, d: int, r: int, n: int, dtype: torch.dtype, max_programs: int,
    l2_bytes: int = L2_RESIDENT,
) -> dict[str, object]:  # fmt: skip
    """Forward (saving h, with residual) and backward (from h, dx needed) of one training step:
    per-kernel bytes, totals, the minimum and the ratio, for a GPU of max_programs/4 SMs."""
    x, params, res = _inputs(T, d, r, n, dtype)
    fwd, _, h = forward_plan(x, *params, 0.5, res, save_h=True)
    plan = backward_plan(res, x, *params, 0.5, True, h, max_programs)
    kernels_f = [launch_traffic(launch, l2_bytes) for launch in fwd]
    kernels_b = [launch_traffic(launch, l2_bytes) for launch in plan.launches]
    partial = sum(_nbytes(t) for t in plan.partials.values())
    grads = sum(_nbytes(t) for t in params)
    kernels_b.append(KernelTraffic("reduce", 0, partial, grads))
    act = x.element_size()
    fwd_min = (T * d + 2 * T * res.shape[1]) * act
    bwd_min = (2 * T * d + T * res.shape[1]) * act
    fwd_bytes = sum(k.read + k.written for k in kernels_f)
    bwd_bytes = sum(k.read + k.written for k in kernels_b)
    return {
        "T": T, "d": d, "r": r, "branches": n, "dtype": str(dtype).removeprefix("torch."),
        "max_programs": max_programs,
        "forward": [k.__dict__ for k in kernels_f], "backward": [k.__dict__ for k in kernels_b],
        "fwd_bytes": fwd_bytes, "fwd_min": fwd_min, "fwd_ratio": fwd_bytes / fwd_min,
        "bwd_bytes": bwd_bytes, "bwd_min": bwd_min, "bwd_ratio": bwd_bytes / bwd_min,
        "partial_bytes": partial, "weight_grad_bytes": grads,
    }  # fmt: skip
