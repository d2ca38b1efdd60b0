"""Triton fused multi-branch adapter: the @triton.jit kernels (launchers: triton_path.py).

Math (DESIGN.md section 3), x: [T, K], D: [K, r], C: [n, r, r], q: [n, r], U: [r, N]:

    h = x @ D + b_D,  z = gelu(h),  u = z + sum_b alpha_b (z @ C_b + q_b)
    out = residual + s * (u @ U + b_U)

The op is memory-bound (~10 FLOP/byte), so every kernel is laid out by the bytes it moves.
Only rank-sized [T, r] intermediates (r/K of x per tensor) ever touch global memory.

Forward, two launches:
  _rank_fwd_kernel   grid (T tiles):         read x, write u (and h, fp32, when the autograd
                                             path saves it for the backward)
  _up_kernel         grid (T tiles, N tiles): read u, residual; write out = res + s(u U + b_U)
The 2-D grid of the streaming kernel fills a large GPU at any T; x is read exactly once.

Backward (g = d out), derived by hand:
    dU = s u^T g, db_U = s sum_t g_t, du = s g U^T
    dalpha_{t,b} = <du_t, z_t C_b + q_b>, dC_b = z^T (alpha_b du), dq_b = sum_t alpha_{t,b} du_t
    dz = du + sum_b (alpha_b du) C_b^T,  dh = dz * gelu'(h),  gelu'(h) = Phi(h) + h phi(h)
    dD = x^T dh, db_D = sum_t dh_t, dx = dh D^T, dresidual = g
four launches, no atomics, no zero-fill, no load-add-store of partial sums:
  _rank_bwd_kernel   grid (T tiles):   read h (or x to recompute it) and g; write the rank-sized
                                       u, z, du, dh and the per-token dalpha
  _branch_kernel grid (P_s, n):   split-K over tokens for dC_b, dq_b (and db_D at b = 0):
                                       reads z, du (, dh) only; one fp32 slot per program
  _strip_kernel grid (W strips, P_T): split-K over tokens for a [r, W] weight gradient
                                       A^T B: each program owns a W-strip and a token chunk and
                                       keeps its [R_PAD, BLOCK_W] sum in registers across every
                                       tile of the chunk; one fp32 slot per program. Run twice:
                                       dU = u^T g (+ column sums of g: db_U), and
                                       dD^T = dh^T x with dx = dh D^T written tile by tile.
The P slots are summed by the host (torch.sum: deterministic). Traffic: x once, g twice
(du, dU), dx once, plus the rank-sized tensors (re-read once per W-strip: R/BLOCK_W of g).

Offsets: every row offset is int64 (rows * K passes 2**31 at T = 524,288, d = 4096).
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
def _rank_load(ptr, rows, row_mask, rk, r_mask, R):
    """[BLOCK_T, R_PAD] tile of a row-major [T, R] tensor, fp32 (int64 row offsets)."""
    offs = rows.to(tl.int64)[:, None] * R + rk[None, :]
    return tl.load(ptr + offs, mask=row_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _rank_store(ptr, val, rows, row_mask, rk, r_mask, R):
    offs = rows.to(tl.int64)[:, None] * R + rk[None, :]
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=row_mask[:, None] & r_mask[None, :])


@triton.jit
def _hidden_tile(
    x_ptr, D_ptr, bD_ptr, rows, row_mask, rk, r_mask, K, R, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    """h = x[rows] @ D + b_D as fp32 [BLOCK_T, R_PAD] (padded rows/lanes exactly 0 + bias)."""
    acc = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < K
        xt = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & km[None, :], other=0.0)
        dt = tl.load(
            D_ptr + ks[:, None] * R + rk[None, :], mask=km[:, None] & r_mask[None, :], other=0.0
        )
        acc = tl.dot(xt.to(DOT_DTYPE), dt.to(DOT_DTYPE), acc, input_precision="ieee")
    b = tl.load(bD_ptr + rk, mask=r_mask, other=0.0).to(tl.float32)
    return acc + b[None, :]


@triton.jit
def _branch(
    z_dot, C_ptr, q_ptr, alpha_ptr, b, rows, row_mask, rk, r_mask, R, stride_at,
    DOT_DTYPE: tl.constexpr,
):  # fmt: skip
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
    z, C_ptr, q_ptr, alpha_ptr, rows, row_mask, rk, r_mask, R, n_branch, stride_at,
    DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    """u = z + sum_b alpha_b (z C_b + q_b), all in registers."""
    z_dot = z.to(DOT_DTYPE)
    u = z
    for b in range(0, n_branch):
        yb, ab = _branch(
            z_dot, C_ptr, q_ptr, alpha_ptr, b, rows, row_mask, rk, r_mask, R, stride_at, DOT_DTYPE
        )
        u += ab[:, None] * yb
    return u


@triton.jit(do_not_specialize=["T", "stride_at", "n_branch"])
def _rank_fwd_kernel(
    x_ptr, D_ptr, bD_ptr, C_ptr, q_ptr, alpha_ptr, h_ptr, u_ptr, T, K, R, n_branch, stride_at,
    SAVE_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    """Per row tile: h over a K-loop (reads x once), u in registers; writes u (and h)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rk = tl.arange(0, R_PAD)
    r_mask = rk < R
    h = _hidden_tile(
        x_ptr, D_ptr, bD_ptr, rows, row_mask, rk, r_mask, K, R, BLOCK_T, BLOCK_K, R_PAD, DOT_DTYPE
    )
    if SAVE_H:
        _rank_store(h_ptr, h, rows, row_mask, rk, r_mask, R)
    u = _mix_tile(
        _gelu(h), C_ptr, q_ptr, alpha_ptr, rows, row_mask, rk, r_mask, R, n_branch, stride_at,
        DOT_DTYPE
    )  # fmt: skip
    _rank_store(u_ptr, u, rows, row_mask, rk, r_mask, R)


@triton.jit(do_not_specialize=["T"])
def _up_kernel(
    u_ptr, U_ptr, bU_ptr, res_ptr, out_ptr, T, R, N, scale, HAS_RES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    """out[tile] = residual + s * (u U + b_U) for one (row tile, column tile): pure streaming."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < T
    nm = ns < N
    rk = tl.arange(0, R_PAD)
    r_mask = rk < R
    u = _rank_load(u_ptr, rows, row_mask, rk, r_mask, R).to(DOT_DTYPE)
    ut = tl.load(
        U_ptr + rk[:, None] * N + ns[None, :], mask=r_mask[:, None] & nm[None, :], other=0.0
    )
    bu = tl.load(bU_ptr + ns, mask=nm, other=0.0).to(tl.float32)
    o = scale * (tl.dot(u, ut.to(DOT_DTYPE), input_precision="ieee") + bu[None, :])
    offs = rows.to(tl.int64)[:, None] * N + ns[None, :]
    omask = row_mask[:, None] & nm[None, :]
    if HAS_RES:
        o += tl.load(res_ptr + offs, mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _out_grad(
    g_ptr, U_ptr, rows, row_mask, rk, r_mask, N, scale, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    """du = s g U^T over an N-loop, fp32 [BLOCK_T, R_PAD] (g's rows read once here)."""
    du = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * N
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        nm = ns < N
        g = tl.load(g_rows + ns[None, :], mask=row_mask[:, None] & nm[None, :], other=0.0)
        umask = r_mask[:, None] & nm[None, :]
        ut = tl.load(U_ptr + rk[:, None] * N + ns[None, :], mask=umask, other=0.0)
        du = tl.dot(g.to(DOT_DTYPE), tl.trans(ut.to(DOT_DTYPE)), du, input_precision="ieee")
    return du * scale


@triton.jit
def _mix_grad(
    z, du, C_ptr, q_ptr, alpha_ptr, dalpha_ptr, rows, row_mask, rk, r_mask, R, n_branch,
    stride_at, TOKEN_ALPHA: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    """dz = du + sum_b (alpha_b du) C_b^T; per-token dalpha rows stored (per-layer dalpha, dC
    and dq are token sums: _branch_kernel)."""
    z_dot = z.to(DOT_DTYPE)
    dz = du
    cmask = r_mask[:, None] & r_mask[None, :]
    for b in range(0, n_branch):
        ab = tl.load(alpha_ptr + rows * stride_at + b, mask=row_mask, other=0.0).to(tl.float32)
        if TOKEN_ALPHA:
            yb, ab = _branch(
                z_dot, C_ptr, q_ptr, alpha_ptr, b, rows, row_mask, rk, r_mask, R, stride_at,
                DOT_DTYPE
            )  # fmt: skip
            tl.store(dalpha_ptr + rows * n_branch + b, tl.sum(du * yb, axis=1), mask=row_mask)
        # C_b^T straight from memory (not tl.trans of a C_b tile): no transposed staging copy
        cbt = tl.load(C_ptr + b * R * R + rk[None, :] * R + rk[:, None], mask=cmask, other=0.0)
        adu = (ab[:, None] * du).to(DOT_DTYPE)
        dz = tl.dot(adu, cbt.to(DOT_DTYPE), dz, input_precision="ieee")
    return dz


@triton.jit(do_not_specialize=["T", "stride_at", "n_branch"])
def _rank_bwd_kernel(
    x_ptr, D_ptr, bD_ptr, C_ptr, q_ptr, alpha_ptr, U_ptr, g_ptr, h_ptr, u_ptr, z_ptr, du_ptr,
    dh_ptr, dhd_ptr, dalpha_ptr, T, K, R, N, n_branch, stride_at, scale, HAS_H: tl.constexpr,
    TOKEN_ALPHA: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    """Per row tile: everything rank-sized. Reads h (or x) and g; writes u, z, du, dh, dalpha.

    dh goes out twice: fp32 (dh_ptr, summed into db_D) and in the dot dtype (dhd_ptr, re-read by
    every K-strip of the dD/dx pass: half the bytes in fp16/bf16; the launcher passes one
    buffer for both when the dot dtype is fp32)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rk = tl.arange(0, R_PAD)
    r_mask = rk < R
    if HAS_H:  # saved by the forward: x is not read here at all
        h = _rank_load(h_ptr, rows, row_mask, rk, r_mask, R)
    else:
        h = _hidden_tile(
            x_ptr, D_ptr, bD_ptr, rows, row_mask, rk, r_mask, K, R, BLOCK_T, BLOCK_K, R_PAD,
            DOT_DTYPE
        )  # fmt: skip
    z = _gelu(h)
    u = _mix_tile(
        z, C_ptr, q_ptr, alpha_ptr, rows, row_mask, rk, r_mask, R, n_branch, stride_at, DOT_DTYPE
    )
    _rank_store(u_ptr, u, rows, row_mask, rk, r_mask, R)
    _rank_store(z_ptr, z, rows, row_mask, rk, r_mask, R)
    du = _out_grad(
        g_ptr, U_ptr, rows, row_mask, rk, r_mask, N, scale, BLOCK_T, BLOCK_N, R_PAD, DOT_DTYPE
    )
    _rank_store(du_ptr, du, rows, row_mask, rk, r_mask, R)
    dz = _mix_grad(
        z, du, C_ptr, q_ptr, alpha_ptr, dalpha_ptr, rows, row_mask, rk, r_mask, R, n_branch,
        stride_at, TOKEN_ALPHA, DOT_DTYPE
    )  # fmt: skip
    dh = dz * _gelu_grad(h)
    _rank_store(dh_ptr, dh, rows, row_mask, rk, r_mask, R)
    _rank_store(dhd_ptr, dh, rows, row_mask, rk, r_mask, R)


@triton.jit(do_not_specialize=["T", "tiles_per_prog", "stride_at", "n_branch"])
def _branch_kernel(
    z_ptr, du_ptr, dh_ptr, C_ptr, q_ptr, alpha_ptr, pC_ptr, pq_ptr, pa_ptr, pbD_ptr, T, R,
    n_branch, stride_at, tiles_per_prog, TOKEN_ALPHA: tl.constexpr, BLOCK_T: tl.constexpr,
    R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    """Program (p, b): token chunk p's dC_b, dq_b, per-layer dalpha_b (and db_D at b = 0),
    summed in registers over the chunk; reads only rank-sized z, du (, dh)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rk = tl.arange(0, R_PAD)
    r_mask = rk < R
    acc_c = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    acc_q = tl.zeros((R_PAD,), dtype=tl.float32)
    acc_b = tl.zeros((R_PAD,), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_T,), dtype=tl.float32)
    cmask = r_mask[:, None] & r_mask[None, :]
    for i in range(0, tiles_per_prog):
        rows = (pid * tiles_per_prog + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_mask = rows < T
        z = _rank_load(z_ptr, rows, row_mask, rk, r_mask, R)
        du = _rank_load(du_ptr, rows, row_mask, rk, r_mask, R)
        ab = tl.load(alpha_ptr + rows * stride_at + b, mask=row_mask, other=0.0).to(tl.float32)
        if not TOKEN_ALPHA:  # dalpha_b = sum_t <du_t, z_t C_b + q_b>
            # C_b re-read per tile (L1/L2-resident): held across the loop, an fp32 C_b in the
            # FMA dot's operand layout costs > 128 registers per thread at R_PAD = 64 (spills)
            yb, ab = _branch(
                z.to(DOT_DTYPE), C_ptr, q_ptr, alpha_ptr, b, rows, row_mask, rk, r_mask, R,
                stride_at, DOT_DTYPE
            )  # fmt: skip
            acc_a += tl.sum(du * yb, axis=1)
        adu = ab[:, None] * du
        acc_c = tl.dot(tl.trans(z.to(DOT_DTYPE)), adu.to(DOT_DTYPE), acc_c, input_precision="ieee")
        acc_q += tl.sum(adu, axis=0)
        if b == 0:
            acc_b += tl.sum(_rank_load(dh_ptr, rows, row_mask, rk, r_mask, R), axis=0)
    slot = pid * n_branch + b
    tl.store(pC_ptr + slot * R * R + rk[:, None] * R + rk[None, :], acc_c, mask=cmask)
    tl.store(pq_ptr + slot * R + rk, acc_q, mask=r_mask)
    tl.store(pa_ptr + slot, tl.sum(acc_a, axis=0))
    if b == 0:
        tl.store(pbD_ptr + pid * R + rk, acc_b, mask=r_mask)


@triton.jit(do_not_specialize=["T", "tiles_per_prog"])
def _strip_kernel(
    a_ptr, b_ptr, w_ptr, dx_ptr, part_ptr, psum_ptr, T, W, R, tiles_per_prog,
    WRITE_DX: tl.constexpr, B_SUMS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
    R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    """Program (strip s, chunk p): part[p, :, strip] = A^T B over the chunk's rows (registers).

    A [T, R] is rank-sized (u or dh), B [T, W] is streamed once in total (g or x). WRITE_DX
    also stores dx = A w^T for the strip (w = D, [W, R]); B_SUMS the column sums of B (db_U).
    """
    ws = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    pid_t = tl.program_id(1)
    wm = ws < W
    rk = tl.arange(0, R_PAD)
    r_mask = rk < R
    acc = tl.zeros((R_PAD, BLOCK_W), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_W,), dtype=tl.float32)
    if WRITE_DX:  # D^T strip [R_PAD, BLOCK_W], loaded transposed (no tl.trans) once per chunk
        wt = tl.load(w_ptr + ws[None, :] * R + rk[:, None], mask=r_mask[:, None] & wm[None, :])
        wt = wt.to(DOT_DTYPE)
    for i in range(0, tiles_per_prog):
        rows = (pid_t * tiles_per_prog + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_mask = rows < T
        a = _rank_load(a_ptr, rows, row_mask, rk, r_mask, R).to(DOT_DTYPE)
        offs = rows.to(tl.int64)[:, None] * W + ws[None, :]
        bmask = row_mask[:, None] & wm[None, :]
        bt = tl.load(b_ptr + offs, mask=bmask, other=0.0)
        acc = tl.dot(tl.trans(a), bt.to(DOT_DTYPE), acc, input_precision="ieee")
        if B_SUMS:
            acc_s += tl.sum(bt.to(tl.float32), axis=0)
        if WRITE_DX:
            dx = tl.dot(a, wt, input_precision="ieee")
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=bmask)
    p_offs = pid_t.to(tl.int64) * R * W + rk[:, None] * W + ws[None, :]
    tl.store(part_ptr + p_offs, acc, mask=r_mask[:, None] & wm[None, :])
    if B_SUMS:
        tl.store(psum_ptr + pid_t.to(tl.int64) * W + ws, acc_s, mask=wm)
