"""Triton path of the fused adapter: thin launchers over triton_kernels.py and autograd.Function.

Launchers check shapes (rejecting what a real GPU would reject), allocate, pick a compile-time
configuration (rank bucket -> block sizes; aot.py compiles every one of them) and launch. No
math here: the kernels, their memory traffic and the backward derivation are documented in
triton_kernels.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_kernels import (
    _TL_DTYPE,
    MAX_BRANCHES,
    MAX_RANK,
    _fused_adapter_bwd_kernel,
    _fused_adapter_fwd_kernel,
)

# ---------------------------------------------------------------------------------------------
# Launchers: check shapes, allocate, pick a configuration, launch. No math here.
# ---------------------------------------------------------------------------------------------

INTERPRETED = not isinstance(_fused_adapter_fwd_kernel, triton.runtime.jit.JITFunction)


@dataclass(frozen=True)
class KernelConfig:
    """Compile-time tiling of one kernel launch (all dot dimensions are >= 16)."""

    block_t: int
    block_k: int
    block_n: int
    r_pad: int
    num_warps: int
    num_stages: int = 2


RANK_BUCKETS = (16, 32, 64, 128)


def rank_bucket(r: int) -> int:
    """Padded rank: the next power of two, at least 16 (GPU tl.dot minimum), at most 128."""
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"fused_adapter: rank {r} outside 1..{MAX_RANK}")
    return max(16, triton.next_power_of_2(r))


def fwd_config(r: int) -> KernelConfig:
    """Forward tiling for rank r: fewer rows per program as the fp32 [T, R_PAD] tiles grow."""
    rp = rank_bucket(r)
    return KernelConfig(
        block_t=64 if rp <= 64 else 32,
        block_k=64 if rp <= 32 else 32,
        block_n=64,
        r_pad=rp,
        num_warps=4 if rp <= 64 else 8,
    )


def bwd_config(r: int) -> KernelConfig:
    """Backward tiling: five live [BLOCK_T, R_PAD] fp32 tiles (h, z, u, du, dz), so 32 rows.

    num_stages=1: software pipelining would double every staged operand, and fp32 at R_PAD=128
    then needs 192 KB of shared memory (> sm_89's 99 KB per block); unpipelined it is 96 KB.
    """
    rp = rank_bucket(r)
    return KernelConfig(
        block_t=32, block_k=32, block_n=32, r_pad=rp, num_warps=4 if rp <= 64 else 8, num_stages=1
    )


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand dtype of every tl.dot for activations of `dtype` (see module docstring)."""
    if dtype == torch.bfloat16 and INTERPRETED:
        return tl.float32
    return _TL_DTYPE[dtype]


def _check_inputs(
    x: Tensor,
    D: Tensor,
    b_D: Tensor,
    C: Tensor,
    q: Tensor,
    alpha: Tensor,
    U: Tensor,
    b_U: Tensor,
    residual: Tensor | None,
) -> tuple[int, int, int, int, int]:
    """Raise on anything the kernels (or a real GPU) would reject; return (T, K, R, N, n)."""
    if x.device.type != "cuda" and not (x.device.type == "cpu" and INTERPRETED):
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


def triton_forward(
    x: Tensor,
    D: Tensor,
    b_D: Tensor,
    C: Tensor,
    q: Tensor,
    alpha: Tensor,
    U: Tensor,
    b_U: Tensor,
    scale: float,
    residual: Tensor | None = None,
) -> Tensor:
    """One launch of the forward kernel; x [T, K] -> out [T, N] in x.dtype."""
    T, K, R, N, n = _check_inputs(x, D, b_D, C, q, alpha, U, b_U, residual)
    x, D, b_D, C, q, alpha, U, b_U = _in_dtype(x.dtype, x, D, b_D, C, q, alpha, U, b_U)
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    res = (
        out if residual is None else residual.contiguous()
    )  # dummy pointer, never read when has_res=0
    cfg = fwd_config(R)
    _fused_adapter_fwd_kernel[(triton.cdiv(T, cfg.block_t),)](
        x,
        D,
        b_D,
        C,
        q,
        alpha,
        U,
        b_U,
        res,
        out,
        T,
        K,
        R,
        N,
        n,
        0 if alpha.dim() == 1 else n,
        float(scale),
        int(residual is not None),
        BLOCK_T=cfg.block_t,
        BLOCK_K=cfg.block_k,
        BLOCK_N=cfg.block_n,
        R_PAD=cfg.r_pad,
        DOT_DTYPE=dot_dtype(x.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def default_max_programs(device: torch.device) -> int:
    """Backward grid cap: enough programs to fill the GPU, few under the interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def triton_backward(
    grad: Tensor,
    x: Tensor,
    D: Tensor,
    b_D: Tensor,
    C: Tensor,
    q: Tensor,
    alpha: Tensor,
    U: Tensor,
    b_U: Tensor,
    scale: float,
    need_dx: bool = True,
    max_programs: int | None = None,
) -> tuple[Tensor | None, ...]:
    """(dx, dD, db_D, dC, dq, dalpha, dU, db_U); deterministic (per-program partials, no atomics)."""
    T, K, R, N, n = _check_inputs(x, D, b_D, C, q, alpha, U, b_U, None)
    param_dtypes = [t.dtype for t in (D, b_D, C, q, alpha, U, b_U)]
    x, D, b_D, C, q, alpha, U, g = _in_dtype(x.dtype, x, D, b_D, C, q, alpha, U, grad)
    cfg = bwd_config(R)
    P = max(1, min(triton.cdiv(T, cfg.block_t), max_programs or default_max_programs(x.device)))
    shapes = [(K, R), (R,), (n, R, R), (n, R), (R, N), (N,)]  # dD, db_D, dC, dq, dU, db_U
    sizes = [P * int(torch.Size(s).numel()) for s in shapes]
    flat = torch.zeros(sum(sizes), dtype=torch.float32, device=x.device)  # one memset
    parts = [p.view(P, *s) for p, s in zip(flat.split(sizes), shapes)]
    dalpha = torch.zeros(T, n, dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x) if need_dx else None
    if T > 0:
        _fused_adapter_bwd_kernel[(P,)](
            x,
            D,
            b_D,
            C,
            q,
            alpha,
            U,
            g,
            x if dx is None else dx,
            *parts,
            dalpha,
            T,
            K,
            R,
            N,
            n,
            0 if alpha.dim() == 1 else n,
            float(scale),
            int(need_dx),
            BLOCK_T=cfg.block_t,
            BLOCK_K=cfg.block_k,
            BLOCK_N=cfg.block_n,
            R_PAD=cfg.r_pad,
            DOT_DTYPE=dot_dtype(x.dtype),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    dD, db_D, dC, dq, dU, db_U = (p.sum(0) for p in parts)  # fp32 partials, fp32 sums
    dalpha = dalpha.sum(0) if alpha.dim() == 1 else dalpha
    grads = (dD, db_D, dC, dq, dalpha, dU, db_U)
    return dx, *(gr.to(dt) for gr, dt in zip(grads, param_dtypes))


class TritonFusedAdapter(torch.autograd.Function):
    """Direct autograd wrapper over the Triton launchers (saves only inputs and parameters)."""

    @staticmethod
    def forward(ctx, x, D, b_D, C, q, alpha, U, b_U, scale, residual):  # type: ignore[override]
        ctx.save_for_backward(x, D, b_D, C, q, alpha, U, b_U)
        ctx.scale = scale
        ctx.has_residual = residual is not None
        return triton_forward(x, D, b_D, C, q, alpha, U, b_U, scale, residual)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grads = triton_backward(
            grad, *ctx.saved_tensors, ctx.scale, need_dx=ctx.needs_input_grad[0]
        )
        return (*grads, None, grad if ctx.has_residual else None)
