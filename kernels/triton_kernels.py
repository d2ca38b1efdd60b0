"""Triton fused multi-branch adapter: the @triton.jit kernels (launchers: triton_path.py).

Math (DESIGN.md section 3), x: [T, K], D: [K, r], C: [n, r, r], q: [n, r], U: [r, N]:

    h = x @ D + b_D,  z = gelu(h),  u = z + sum_b alpha_b (z @ C_b + q_b)
    out = residual + s * (u @ U + b_U)

Forward: one launch; each program owns BLOCK_T rows, accumulates h over a K-loop, mixes the
branches in registers and streams the output over an N-loop. Only x, the parameters and the
residual are read and only `out` is written (h, z, u never touch global memory):
traffic = T*K + T*N (+ T*N residual) elements, plus the small parameters once per program.

Backward (g = d out), z recomputed from x (nothing rank-sized is saved):
    dU = s u^T g, db_U = s sum_t g_t, du = s g U^T
    dalpha_{t,b} = <du_t, z_t C_b + q_b>, dC_b = z^T (alpha_b du), dq_b = sum_t alpha_{t,b} du_t
    dz = du + sum_b (alpha_b du) C_b^T,  dh = dz * gelu'(h),  gelu'(h) = Phi(h) + h phi(h)
    dD = x^T dh, db_D = sum_t dh_t, dx = dh D^T, dresidual = g
One launch over a capped grid; program p walks row tiles p, p+P, ... and adds its weight-grad
contributions into its *own* fp32 slot of a partial buffer (load-add-store, no atomics), so the
result is bitwise deterministic; the host reduces the P slots with one `sum(0)`. Traffic:
x read twice (recompute, then dD/dx), g once, dx written once, partials P*(K*r + r*N) floats.

The rank is padded to R_PAD >= 16 (masked loads give exact zeros, gelu(0) = 0, so padded lanes
stay zero) because GPU `tl.dot` needs every dimension >= 16; the interpreter would accept less.
fp16/bf16 operands feed the dots in their own dtype with fp32 accumulation; fp32 uses IEEE
dots (no TF32, to match torch's default matmul precision). The interpreter computes bf16 dots
wrongly, so under TRITON_INTERPRET=1 bf16 operands are upcast to fp32 for the dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_RANK = 128
MAX_BRANCHES = 8
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _gelu(h):
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def _gelu_grad(h):
    cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
    return cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327


@triton.jit
def _hidden_tile(
    x_ptr,
    D_ptr,
    bD_ptr,
    rows,
    row_mask,
    rk,
    r_mask,
    K,
    R,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """h = x[rows] @ D + b_D as fp32 [BLOCK_T, R_PAD] (padded rows/lanes exactly 0 + bias)."""
    acc = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < K
        xt = tl.load(
            x_ptr + rows[:, None] * K + ks[None, :], mask=row_mask[:, None] & km[None, :], other=0.0
        )
        dt = tl.load(
            D_ptr + ks[:, None] * R + rk[None, :], mask=km[:, None] & r_mask[None, :], other=0.0
        )
        acc = tl.dot(xt.to(DOT_DTYPE), dt.to(DOT_DTYPE), acc, input_precision="ieee")
    b = tl.load(bD_ptr + rk, mask=r_mask, other=0.0).to(tl.float32)
    return acc + b[None, :]


@triton.jit
def _branch(
    z_dot,
    C_ptr,
    q_ptr,
    alpha_ptr,
    b,
    rows,
    row_mask,
    rk,
    r_mask,
    R,
    stride_at,
    DOT_DTYPE: tl.constexpr,
):
    """(y_b = z C_b + q_b [BLOCK_T, R_PAD] fp32, alpha_b per row [BLOCK_T] fp32)."""
    cb = tl.load(
        C_ptr + b * R * R + rk[:, None] * R + rk[None, :],
        mask=r_mask[:, None] & r_mask[None, :],
        other=0.0,
    ).to(DOT_DTYPE)
    qb = tl.load(q_ptr + b * R + rk, mask=r_mask, other=0.0).to(tl.float32)
    ab = tl.load(alpha_ptr + rows * stride_at + b, mask=row_mask, other=0.0).to(tl.float32)
    yb = tl.dot(z_dot, cb, input_precision="ieee") + qb[None, :]
    return yb, ab


@triton.jit
def _mix_tile(
    z,
    C_ptr,
    q_ptr,
    alpha_ptr,
    rows,
    row_mask,
    rk,
    r_mask,
    R,
    n_branch,
    stride_at,
    DOT_DTYPE: tl.constexpr,
):
    """u = z + sum_b alpha_b (z C_b + q_b), all in registers."""
    z_dot = z.to(DOT_DTYPE)
    u = z
    for b in range(0, n_branch):
        yb, ab = _branch(
            z_dot, C_ptr, q_ptr, alpha_ptr, b, rows, row_mask, rk, r_mask, R, stride_at, DOT_DTYPE
        )
        u += ab[:, None] * yb
    return u


@triton.jit
def _fused_adapter_fwd_kernel(
    x_ptr,
    D_ptr,
    bD_ptr,
    C_ptr,
    q_ptr,
    alpha_ptr,
    U_ptr,
    bU_ptr,
    res_ptr,
    out_ptr,
    T,
    K,
    R,
    N,
    n_branch,
    stride_at,
    scale,
    has_res,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rk = tl.arange(0, R_PAD)
    r_mask = rk < R
    h = _hidden_tile(
        x_ptr, D_ptr, bD_ptr, rows, row_mask, rk, r_mask, K, R, BLOCK_T, BLOCK_K, R_PAD, DOT_DTYPE
    )
    u = _mix_tile(
        _gelu(h),
        C_ptr,
        q_ptr,
        alpha_ptr,
        rows,
        row_mask,
        rk,
        r_mask,
        R,
        n_branch,
        stride_at,
        DOT_DTYPE,
    )
    u_dot = u.to(DOT_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        nm = ns < N
        ut = tl.load(
            U_ptr + rk[:, None] * N + ns[None, :], mask=r_mask[:, None] & nm[None, :], other=0.0
        )
        bu = tl.load(bU_ptr + ns, mask=nm, other=0.0).to(tl.float32)
        o = scale * (tl.dot(u_dot, ut.to(DOT_DTYPE), input_precision="ieee") + bu[None, :])
        offs = rows[:, None] * N + ns[None, :]
        omask = row_mask[:, None] & nm[None, :]
        if has_res:  # runtime flag: one compiled kernel serves both cases
            o += tl.load(res_ptr + offs, mask=omask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _out_backward(
    u_dot,
    g_ptr,
    U_ptr,
    pU_ptr,
    pbU_ptr,
    rows,
    row_mask,
    rk,
    r_mask,
    N,
    scale,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """N-loop: du = s g U^T (returned, fp32) and this program's dU / db_U partial slots += ."""
    du = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        nm = ns < N
        g = tl.load(
            g_ptr + rows[:, None] * N + ns[None, :], mask=row_mask[:, None] & nm[None, :], other=0.0
        ).to(DOT_DTYPE)
        umask = r_mask[:, None] & nm[None, :]
        ut = tl.load(U_ptr + rk[:, None] * N + ns[None, :], mask=umask, other=0.0)
        du = tl.dot(g, tl.trans(ut.to(DOT_DTYPE)), du, input_precision="ieee")
        p_offs = pU_ptr + rk[:, None] * N + ns[None, :]
        pu = tl.load(p_offs, mask=umask, other=0.0)
        pu += scale * tl.dot(tl.trans(u_dot), g, input_precision="ieee")
        tl.store(p_offs, pu, mask=umask)
        pbu = tl.load(pbU_ptr + ns, mask=nm, other=0.0)
        tl.store(pbU_ptr + ns, pbu + scale * tl.sum(g.to(tl.float32), axis=0), mask=nm)
    return du * scale


@triton.jit
def _mix_backward(
    z,
    du,
    C_ptr,
    q_ptr,
    alpha_ptr,
    pC_ptr,
    pq_ptr,
    dalpha_ptr,
    rows,
    row_mask,
    rk,
    r_mask,
    R,
    n_branch,
    stride_at,
    DOT_DTYPE: tl.constexpr,
):
    """dz = du + sum_b (alpha_b du) C_b^T; dalpha rows stored; dC / dq partial slots += ."""
    z_dot = z.to(DOT_DTYPE)
    dz = du
    cmask = r_mask[:, None] & r_mask[None, :]
    for b in range(0, n_branch):
        yb, ab = _branch(
            z_dot, C_ptr, q_ptr, alpha_ptr, b, rows, row_mask, rk, r_mask, R, stride_at, DOT_DTYPE
        )
        tl.store(dalpha_ptr + rows * n_branch + b, tl.sum(du * yb, axis=1), mask=row_mask)
        adu = ab[:, None] * du
        adu_dot = adu.to(DOT_DTYPE)
        c_offs = pC_ptr + b * R * R + rk[:, None] * R + rk[None, :]
        pc = tl.load(c_offs, mask=cmask, other=0.0)
        pc += tl.dot(tl.trans(z_dot), adu_dot, input_precision="ieee")
        tl.store(c_offs, pc, mask=cmask)
        pq = tl.load(pq_ptr + b * R + rk, mask=r_mask, other=0.0)
        tl.store(pq_ptr + b * R + rk, pq + tl.sum(adu, axis=0), mask=r_mask)
        # C_b^T straight from memory (not tl.trans of the tile above): the r x r staging buffer
        # of C_b is dead by now and its shared memory is reused (fp32 r=128: 64 KB each)
        cbt = tl.load(C_ptr + b * R * R + rk[None, :] * R + rk[:, None], mask=cmask, other=0.0)
        dz = tl.dot(adu_dot, cbt.to(DOT_DTYPE), dz, input_precision="ieee")
    return dz


@triton.jit
def _input_backward(
    dh,
    x_ptr,
    D_ptr,
    dx_ptr,
    pD_ptr,
    rows,
    row_mask,
    rk,
    r_mask,
    K,
    R,
    need_dx,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """K-loop: dx = dh D^T (stored) and this program's dD partial slot += x^T dh."""
    dh_dot = dh.to(DOT_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < K
        dmask = km[:, None] & r_mask[None, :]
        if need_dx:  # runtime flag (x may not need a gradient: lowest adapter)
            dt = tl.load(D_ptr + ks[:, None] * R + rk[None, :], mask=dmask, other=0.0)
            dx = tl.dot(dh_dot, tl.trans(dt.to(DOT_DTYPE)), input_precision="ieee")
            xmask = row_mask[:, None] & km[None, :]
            tl.store(
                dx_ptr + rows[:, None] * K + ks[None, :], dx.to(dx_ptr.dtype.element_ty), mask=xmask
            )
        xt = tl.load(
            x_ptr + rows[:, None] * K + ks[None, :], mask=row_mask[:, None] & km[None, :], other=0.0
        )
        p_offs = pD_ptr + ks[:, None] * R + rk[None, :]
        pd = tl.load(p_offs, mask=dmask, other=0.0)
        pd += tl.dot(tl.trans(xt.to(DOT_DTYPE)), dh_dot, input_precision="ieee")
        tl.store(p_offs, pd, mask=dmask)


@triton.jit
def _fused_adapter_bwd_kernel(
    x_ptr, D_ptr, bD_ptr, C_ptr, q_ptr, alpha_ptr, U_ptr, g_ptr, dx_ptr, pD_ptr, pbD_ptr,
    pC_ptr, pq_ptr, pU_ptr, pbU_ptr, dalpha_ptr, T, K, R, N, n_branch, stride_at, scale,
    need_dx, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    rk = tl.arange(0, R_PAD)
    r_mask = rk < R
    # this program's private partial slots (int64: P*K*R may pass 2**31 on big layers)
    slot = pid.to(tl.int64)
    pD_ptr += slot * K * R
    pbD_ptr += slot * R
    pC_ptr += slot * n_branch * R * R
    pq_ptr += slot * n_branch * R
    pU_ptr += slot * R * N
    pbU_ptr += slot * N
    for tile in range(pid, tl.cdiv(T, BLOCK_T), n_prog):
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        row_mask = rows < T
        h = _hidden_tile(
            x_ptr, D_ptr, bD_ptr, rows, row_mask, rk, r_mask, K, R, BLOCK_T, BLOCK_K, R_PAD,
            DOT_DTYPE
        )  # fmt: skip
        z = _gelu(h)
        u = _mix_tile(
            z, C_ptr, q_ptr, alpha_ptr, rows, row_mask, rk, r_mask, R, n_branch, stride_at,
            DOT_DTYPE
        )  # fmt: skip
        du = _out_backward(
            u.to(DOT_DTYPE), g_ptr, U_ptr, pU_ptr, pbU_ptr, rows, row_mask, rk, r_mask, N,
            scale, BLOCK_T, BLOCK_N, R_PAD, DOT_DTYPE
        )  # fmt: skip
        dz = _mix_backward(
            z, du, C_ptr, q_ptr, alpha_ptr, pC_ptr, pq_ptr, dalpha_ptr, rows, row_mask, rk,
            r_mask, R, n_branch, stride_at, DOT_DTYPE
        )  # fmt: skip
        dh = dz * _gelu_grad(h)
        pbd = tl.load(pbD_ptr + rk, mask=r_mask, other=0.0)
        tl.store(pbD_ptr + rk, pbd + tl.sum(dh, axis=0), mask=r_mask)
        _input_backward(
            dh, x_ptr, D_ptr, dx_ptr, pD_ptr, rows, row_mask, rk, r_mask, K, R, need_dx,
            BLOCK_K, DOT_DTYPE
        )  # fmt: skip
