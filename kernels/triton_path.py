"""Triton path of the fused adapter: thin launchers over triton_kernels.py and autograd.Function.

Launchers check shapes (rejecting what a real GPU would reject), allocate, pick a compile-time
configuration per (kernel, rank bucket) and launch. Every launch is first described as a
`Launch` (kernel, grid, arguments, constexprs, warps, stages) by `forward_plan` /
`backward_plan`; running a plan launches exactly those, and `aot.py` compiles exactly those
(same arguments through triton's own specialisation, so the same divisible-by-16 variants).
No math here: the kernels, their memory traffic and the backward derivation are documented in
triton_kernels.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_kernels as tk
from .triton_kernels import _TL_DTYPE, MAX_BRANCHES, MAX_RANK

INTERPRETED = not isinstance(tk._rank_fwd_kernel, triton.runtime.jit.JITFunction)
RANK_BUCKETS = (16, 32, 64, 128)
SCRATCH_RATIO = 4  # backward partial sums <= this many times the weight-gradient elements


def rank_bucket(r: int) -> int:
    """Padded rank: the next power of two, at least 16 (GPU tl.dot minimum), at most 128."""
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"fused_adapter: rank {r} outside 1..{MAX_RANK}")
    return max(16, triton.next_power_of_2(r))


def kernel_config(
    kernel: str, r: int, dtype: torch.dtype = torch.float16, write_dx: bool = True
) -> dict[str, int]:
    """Block sizes, warps and stages of `kernel` at rank r (every dot dimension >= 16).

    Register budget: the fp32 accumulators are [BLOCK_T, R_PAD] (rank kernels), [R_PAD, R_PAD]
    (branch), [BLOCK_T, BLOCK_N] (up) and [R_PAD, BLOCK_W] (strip); fp32 operands make the
    IEEE dots FMA loops that hold their operands in registers, so fp32 gets more warps (or
    narrower tiles) from R_PAD = 32/64 on: 0 spills on sm_87/89/90 for R_PAD <= 64 (aot.py).
    Stages: the loops stream x / g / the strip operand, so they are pipelined; R_PAD = 128
    keeps fewer stages to fit sm_89's 99 KB of shared memory.
    """
    rp = rank_bucket(r)
    wide = dtype == torch.float32
    warps = 8 if rp == 128 or (wide and rp >= 64) else 4
    if kernel == "rank_fwd":
        return dict(BLOCK_T=32, BLOCK_K=64 if rp <= 32 else 32, R_PAD=rp, num_warps=warps,
                    num_stages=3 if rp <= 64 else 2)  # fmt: skip
    if kernel == "up":
        return dict(BLOCK_T=64, BLOCK_N=64 if rp == 128 or (wide and rp >= 32) else 128,
                    R_PAD=rp, num_warps=warps, num_stages=1)  # fmt: skip
    if kernel == "rank_bwd":
        return dict(BLOCK_T=32, BLOCK_K=64 if rp <= 32 else 32, BLOCK_N=64 if rp <= 32 else 32,
                    R_PAD=rp, num_warps=warps, num_stages=2 if rp <= 64 else 1)  # fmt: skip
    if kernel == "branch":
        warps = 8 if rp >= 64 or (wide and rp >= 32) else 4
        return dict(BLOCK_T=16 if wide and rp >= 64 else 32, R_PAD=rp, num_warps=warps,
                    num_stages=2)  # fmt: skip
    if kernel == "strip":
        return dict(BLOCK_T=32, BLOCK_W={16: 128, 32: 128, 64: 64}.get(rp, 32), R_PAD=rp,
                    num_warps=8 if wide and write_dx and rp >= 32 else 4,
                    num_stages=3 if rp <= 64 else 2)  # fmt: skip
    raise ValueError(f"unknown kernel {kernel!r}")


KERNELS = ("rank_fwd", "up", "rank_bwd", "branch", "strip")


@dataclass
class Launch:
    """One kernel launch, fully described (aot.py compiles exactly these)."""

    name: str
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    meta: dict[str, Any] = field(default_factory=dict)  # constexprs + num_warps/num_stages

    @property
    def kernel(self) -> Any:
        return getattr(tk, f"_{self.name}_kernel")

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand dtype of every tl.dot for activations of `dtype` (see triton_kernels)."""
    if dtype == torch.bfloat16 and INTERPRETED:
        return tl.float32
    return _TL_DTYPE[dtype]


def _dot_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}[
        dot_dtype(dtype)
    ]


def _meta(kernel: str, r: int, dtype: torch.dtype, **flags: Any) -> dict[str, Any]:
    cfg = kernel_config(kernel, r, dtype, bool(flags.get("WRITE_DX")))
    return {**cfg, "DOT_DTYPE": dot_dtype(dtype), **flags}


def _check_inputs(
    x: Tensor, D: Tensor, b_D: Tensor, C: Tensor, q: Tensor, alpha: Tensor, U: Tensor,
    b_U: Tensor, residual: Tensor | None,
) -> tuple[int, int, int, int, int]:  # fmt: skip
    """Raise on anything the kernels (or a real GPU) would reject; return (T, K, R, N, n)."""
    if x.device.type not in ("cuda", "meta") and not (x.device.type == "cpu" and INTERPRETED):
        raise RuntimeError(
            "Triton fused_adapter needs a CUDA tensor (or CPU with TRITON_INTERPRET=1"
            f" set before import); got device {x.device}"
        )
    if x.dtype not in _TL_DTYPE:
        raise TypeError(f"fused_adapter: unsupported dtype {x.dtype}")
    T, K = x.shape
    R, N, n = D.shape[1], U.shape[1], C.shape[0]
    rank_bucket(R)
    if not 1 <= n <= MAX_BRANCHES:
        raise ValueError(f"fused_adapter: {n} branches outside 1..{MAX_BRANCHES}")
    want = {"D": (K, R), "b_D": (R,), "C": (n, R, R), "q": (n, R), "U": (R, N), "b_U": (N,)}
    got = {"D": D, "b_D": b_D, "C": C, "q": q, "U": U, "b_U": b_U}
    for name, t in got.items():
        if tuple(t.shape) != want[name]:
            raise ValueError(f"fused_adapter: {name} has shape {tuple(t.shape)}, want {want[name]}")
    if tuple(alpha.shape) not in ((n,), (T, n)):
        raise ValueError(
            f"fused_adapter: alpha shape {tuple(alpha.shape)}, want ({n},) or ({T}, {n})"
        )
    if residual is not None and tuple(residual.shape) != (T, N):
        raise ValueError(f"fused_adapter: residual shape {tuple(residual.shape)}, want ({T}, {N})")
    for t in (D, b_D, C, q, alpha, U, b_U):
        if t.dtype not in (*_TL_DTYPE, torch.float64) or t.device != x.device:
            raise TypeError("fused_adapter (triton): parameters must be float on x's device")
    if residual is not None and (residual.dtype != x.dtype or residual.device != x.device):
        raise TypeError("fused_adapter (triton): residual must share x's dtype and device")
    return T, K, R, N, n


def _in_dtype(dtype: torch.dtype, *ts: Tensor) -> list[Tensor]:
    """Contiguous copies in `dtype` (the kernels read parameters in the activation dtype)."""
    return [t.to(dtype).contiguous() for t in ts]


def forward_plan(
    x: Tensor, D: Tensor, b_D: Tensor, C: Tensor, q: Tensor, alpha: Tensor, U: Tensor,
    b_U: Tensor, scale: float, residual: Tensor | None = None, save_h: bool = False,
) -> tuple[list[Launch], Tensor, Tensor | None]:  # fmt: skip
    """(launches, out [T, N], h [T, R] fp32 or None): allocates, launches nothing."""
    T, K, R, N, n = _check_inputs(x, D, b_D, C, q, alpha, U, b_U, residual)
    x, D, b_D, C, q, alpha, U, b_U = _in_dtype(x.dtype, x, D, b_D, C, q, alpha, U, b_U)
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    h = torch.empty(T, R, dtype=torch.float32, device=x.device) if save_h else None
    u = torch.empty(T, R, dtype=_dot_torch_dtype(x.dtype), device=x.device)
    if T == 0:
        return [], out, h
    stride_at = 0 if alpha.dim() == 1 else n
    m1 = _meta("rank_fwd", R, x.dtype, SAVE_H=save_h)
    rank = Launch(
        "rank_fwd", (triton.cdiv(T, m1["BLOCK_T"]),),
        (x, D, b_D, C, q, alpha, u if h is None else h, u, T, K, R, n, stride_at), m1,
    )  # fmt: skip
    m2 = _meta("up", R, x.dtype, HAS_RES=residual is not None)
    grid = (triton.cdiv(T, m2["BLOCK_T"]), triton.cdiv(N, m2["BLOCK_N"]))
    res = out if residual is None else residual.contiguous()  # dummy pointer when no residual
    up = Launch("up", grid, (u, U, b_U, res, out, T, R, N, float(scale)), m2)
    return [rank, up], out, h


def triton_forward_saving(
    x: Tensor, D: Tensor, b_D: Tensor, C: Tensor, q: Tensor, alpha: Tensor, U: Tensor,
    b_U: Tensor, scale: float, residual: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor]]:  # fmt: skip
    """(out, (h,)): the forward, also writing h = x @ D + b_D ([T, R] fp32) for the backward."""
    launches, out, h = forward_plan(x, D, b_D, C, q, alpha, U, b_U, scale, residual, True)
    for launch in launches:
        launch()
    return out, (h,)


def triton_forward(
    x: Tensor, D: Tensor, b_D: Tensor, C: Tensor, q: Tensor, alpha: Tensor, U: Tensor,
    b_U: Tensor, scale: float, residual: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Forward (two launches, no h written); x [T, K] -> out [T, N] in x.dtype."""
    launches, out, _ = forward_plan(x, D, b_D, C, q, alpha, U, b_U, scale, residual)
    for launch in launches:
        launch()
    return out


def default_max_programs(device: torch.device) -> int:
    """Target program count of the split-K launches: 4 per SM on a GPU, few when interpreted."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def token_splits(
    T: int, K: int, R: int, N: int, n: int, max_programs: int, dtype: torch.dtype = torch.float16
) -> tuple[int, int, int, int]:
    """(P_T, tiles per strip program, P_s, tiles per branch program) for the split-K launches.

    Each program of a split owns a contiguous token chunk and writes one fp32 slot, so the
    partial buffers hold P_T*(R*N + N + R*K) + P_s*(n*R*R + n*R + n) + P_s*R elements; P_T and
    P_s are capped so that this stays <= SCRATCH_RATIO x the weight-gradient elements
    (P_T = P_s = 1 is always within 2x), then sized to reach `max_programs` programs.
    """
    tiles = max(1, triton.cdiv(T, kernel_config("strip", R, dtype)["BLOCK_T"]))
    tiles_s = max(1, triton.cdiv(T, kernel_config("branch", R, dtype)["BLOCK_T"]))
    grads = K * R + R + n * R * R + n * R + n + R * N + N
    per_split, per_branch = R * N + N + R * K, n * (R * R + R + 1) + R
    strips = triton.cdiv(max(K, N), kernel_config("strip", R, dtype)["BLOCK_W"])
    p_t = min(tiles, triton.cdiv(max_programs, strips), (SCRATCH_RATIO - 1) * grads // per_split)
    tpp_t = triton.cdiv(tiles, max(1, p_t))
    p_t = triton.cdiv(tiles, tpp_t)
    room = (SCRATCH_RATIO * grads - p_t * per_split) // per_branch
    p_s = max(1, min(tiles_s, triton.cdiv(max_programs, n), room))
    tpp_s = triton.cdiv(tiles_s, p_s)
    return p_t, tpp_t, triton.cdiv(tiles_s, tpp_s), tpp_s


@dataclass
class BackwardPlan:
    """Launches of one backward and the buffers they fill (partials: fp32, one slot each)."""

    launches: list[Launch]
    dx: Tensor | None
    partials: dict[str, Tensor]  # pU, pbU, pD, pC, pq, pa, pbD
    rank: dict[str, Tensor]  # rank-sized intermediates: u, z, du, dh (+ dh in the dot dtype)
    dalpha: Tensor  # [T, n] per-token alpha (the gradient itself), else unused [0, n]


def _backward_buffers(
    x: Tensor, R: int, N: int, n: int, p_t: int, p_s: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Rank-sized intermediates [T, R] and the fp32 partial slots (every one written)."""
    (T, K), dev, f32, ddt = x.shape, x.device, torch.float32, _dot_torch_dtype(x.dtype)
    ranks = {k: torch.empty(T, R, dtype=f32, device=dev) for k in ("z", "du", "dh")}
    ranks["u"] = torch.empty(T, R, dtype=ddt, device=dev)
    ranks["dhd"] = ranks["dh"] if ddt == f32 else torch.empty(T, R, dtype=ddt, device=dev)
    shapes = {"pU": (p_t, R, N), "pbU": (p_t, N), "pD": (p_t, R, K), "pC": (p_s, n, R, R),
              "pq": (p_s, n, R), "pa": (p_s, n), "pbD": (p_s, R)}  # fmt: skip
    return ranks, {k: torch.empty(s, dtype=f32, device=dev) for k, s in shapes.items()}


def backward_plan(
    grad: Tensor, x: Tensor, D: Tensor, b_D: Tensor, C: Tensor, q: Tensor, alpha: Tensor,
    U: Tensor, b_U: Tensor, scale: float, need_dx: bool = True, h: Tensor | None = None,
    max_programs: int | None = None,
) -> BackwardPlan:  # fmt: skip
    """Allocate and describe the four backward launches (see triton_kernels); launch nothing."""
    T, K, R, N, n = _check_inputs(x, D, b_D, C, q, alpha, U, b_U, None)
    x, D, b_D, C, q, alpha, U, g = _in_dtype(x.dtype, x, D, b_D, C, q, alpha, U, grad)
    progs = max_programs or default_max_programs(x.device)
    p_t, tpp_t, p_s, tpp_s = token_splits(T, K, R, N, n, progs, x.dtype)
    token_alpha, stride_at = alpha.dim() == 2, 0 if alpha.dim() == 1 else n
    ranks, parts = _backward_buffers(x, R, N, n, p_t, p_s)
    dalpha = torch.empty(T if token_alpha else 0, n, dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x) if need_dx else None
    if T == 0:
        for t in parts.values():
            t.zero_()  # no program runs: the sums of nothing
        return BackwardPlan([], dx, parts, ranks, dalpha)
    m = _meta("rank_bwd", R, x.dtype, HAS_H=h is not None, TOKEN_ALPHA=token_alpha)
    hh = ranks["z"] if h is None else h.contiguous()  # dummy pointer when recomputing from x
    rank_args = (x, D, b_D, C, q, alpha, U, g, hh, *(ranks[k] for k in ("u", "z", "du", "dh")))
    launches = [Launch("rank_bwd", (triton.cdiv(T, m["BLOCK_T"]),), (
        *rank_args, ranks["dhd"], dalpha, T, K, R, N, n, stride_at, float(scale)), m)]  # fmt: skip
    mb = _meta("branch", R, x.dtype, TOKEN_ALPHA=token_alpha)
    launches.append(Launch("branch", (p_s, n), (
        ranks["z"], ranks["du"], ranks["dh"], C, q, alpha, parts["pC"], parts["pq"], parts["pa"],
        parts["pbD"], T, R, n, stride_at, tpp_s), mb))  # fmt: skip
    strips = (  # (A, B, dx out, partial, column sums, W, WRITE_DX, B_SUMS)
        (ranks["u"], g, x, parts["pU"], parts["pbU"], N, False, True),  # dU, db_U
        (ranks["dhd"], x, x if dx is None else dx, parts["pD"], parts["pbU"], K, need_dx, False),
    )  # unused pointer arguments get a harmless tensor of the right dtype (never accessed)
    for a, b, out, part, psum, W, write_dx, b_sums in strips:
        ms = _meta("strip", R, x.dtype, WRITE_DX=write_dx, B_SUMS=b_sums)
        grid = (triton.cdiv(W, ms["BLOCK_W"]), p_t)
        launches.append(Launch("strip", grid, (a, b, D, out, part, psum, T, W, R, tpp_t), ms))
    return BackwardPlan(launches, dx, parts, ranks, dalpha)


def triton_backward(
    grad: Tensor, x: Tensor, D: Tensor, b_D: Tensor, C: Tensor, q: Tensor, alpha: Tensor,
    U: Tensor, b_U: Tensor, scale: float, need_dx: bool = True,
    saved: tuple[Tensor] | None = None, max_programs: int | None = None,
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """(dx, dD, db_D, dC, dq, dalpha, dU, db_U); deterministic (fp32 slots summed by torch).

    `saved` = (h,) from triton_forward_saving skips re-reading x for h. Weight gradients are
    reduced in fp32 and returned in each parameter's own dtype (fp32 stays fp32).
    """
    plan = backward_plan(
        grad, x, D, b_D, C, q, alpha, U, b_U, scale, need_dx,
        None if saved is None else saved[0], max_programs,
    )  # fmt: skip
    for launch in plan.launches:
        launch()
    p = plan.partials
    dD = p["pD"].sum(0).t().contiguous()
    dU, db_U = p["pU"].sum(0).mul_(scale), p["pbU"].sum(0).mul_(scale)
    dalpha = plan.dalpha if alpha.dim() == 2 else p["pa"].sum(0)
    grads = (dD, p["pbD"].sum(0), p["pC"].sum(0), p["pq"].sum(0), dalpha, dU, db_U)
    dtypes = [t.dtype for t in (D, b_D, C, q, alpha, U, b_U)]
    return plan.dx, *(gr.to(dt) for gr, dt in zip(grads, dtypes))


class TritonFusedAdapter(torch.autograd.Function):
    """Direct autograd wrapper over the Triton launchers (saves the inputs and h [T, R])."""

    @staticmethod
    def forward(ctx, x, D, b_D, C, q, alpha, U, b_U, scale, residual):  # type: ignore[override]
        out, (h,) = triton_forward_saving(x, D, b_D, C, q, alpha, U, b_U, scale, residual)
        ctx.save_for_backward(x, D, b_D, C, q, alpha, U, b_U, h)
        ctx.scale = scale
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        *inputs, h = ctx.saved_tensors
        grads = triton_backward(
            grad, *inputs, ctx.scale, need_dx=ctx.needs_input_grad[0], saved=(h,)
        )
        return (*grads, None, grad if ctx.has_residual else None)
