"""PyTorch path of the fused adapter (the CPU path): fold the branches, two GEMMs, hand backward.

Math (DESIGN.md section 3), x: [T, K], D: [K, r], C: [n, r, r], q: [n, r], U: [r, N]:

    h = x @ D + b_D,   z = gelu(h),   y_b = z @ C_b + q_b
    u = z + sum_b alpha_b * y_b,      out = residual + s * (u @ U + b_U)

Per-layer alpha ([n]) folds the branches into one r x r matrix and one bias before touching
any token:  M' = sum_b alpha_b C_b,  q' = sum_b alpha_b q_b,  u = z + z @ M' + q'.
(We keep the identity out of M': rounding I + M' would lose alpha*C's low bits against the 1s
in fp16/bf16.)  Per-token alpha ([T, n]) batches all branches into one GEMM against
C_cat = [C_1 | ... | C_n] (r x n*r) and mixes per token with a batched [1 x n] @ [n x r].
The bias b_U and the scale ride inside the second GEMM: with u_aug = [u | 1] and
W = s * [U ; b_U] ((r+1) x N), `out = addmm(residual, u_aug, W)` reads the residual and writes
the output exactly once, as the bare GEMM `z @ U` would.

Memory traffic (fp32 words, forward): read x (T*K) and D, write h/z/u (3*T*r: rank-sized,
i.e. 1/K of x), read residual and write out (2*T*N). That is the bound of the two bare GEMMs
plus the residual read.

Backward (g = d out), derived by hand; z is *recomputed* from x, never saved:
    dU = s * u^T g,  db_U = s * sum_t g_t          (one GEMM: s * u_aug^T g)
    du = s * g U^T
    dalpha_b = sum_t <du_t, y_b,t>   (per layer too: summed per token, for accuracy)
    dC_b = z^T (alpha_b * du),  dq_b = sum_t alpha_b,t du_t
    dz = du + sum_b (alpha_b * du) C_b^T           (= du @ (I + M')^T per layer)
    dh = dz * gelu'(h),  dD = x^T dh,  db_D = sum_t dh_t,  dx = dh D^T,  dresidual = g
Traffic: read x twice-ish (recompute + dD, same pass order) and g twice (dU, du), write dx.
fp16/bf16 inputs are computed in fp32 (CPUs have no fast half GEMM; fp32 accumulation is the
contract) and rounded once on the way out.
"""

from __future__ import annotations

import torch
from torch import Tensor

_Grads = tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _hidden(x: Tensor, D: Tensor, b_D: Tensor) -> tuple[Tensor, Tensor]:
    """h = x @ D + b_D and z = gelu(h) (both [T, r])."""
    h = torch.addmm(b_D, x, D)
    return h, torch.nn.functional.gelu(h)


def _branch_cat(C: Tensor) -> Tensor:
    """[n, r, r] -> C_cat [r, n*r] with C_cat[:, b*r:(b+1)*r] = C_b."""
    n, r, _ = C.shape
    return C.permute(1, 0, 2).reshape(r, n * r)


def _mix(z: Tensor, C: Tensor, q: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor | None]:
    """u = z + sum_b alpha_b (z C_b + q_b); also returns Y = [y_1..y_n] ([T, n, r]) per token."""
    T, r = z.shape
    if alpha.dim() == 1:
        m_fold = torch.einsum("b,bij->ij", alpha, C)
        q_fold = alpha @ q
        return torch.addmm(z, z, m_fold).add_(q_fold), None
    Y = torch.mm(z, _branch_cat(C)).view(T, C.shape[0], r).add_(q)
    u = (alpha.unsqueeze(2) * Y).sum(1).add_(z)
    return u, Y


def _out_weight(U: Tensor, b_U: Tensor, scale: float) -> Tensor:
    """W = s * [U ; b_U], (r+1) x N, so bias and scale ride inside the output GEMM."""
    return torch.cat([U, b_U.unsqueeze(0)], 0).mul_(scale)


def _augment(u: Tensor) -> Tensor:
    """u_aug = [u | 1] ([T, r+1]); rank-sized, so the copy is 1/N of the output GEMM."""
    return torch.cat([u, u.new_ones(u.shape[0], 1)], 1)


def torch_forward(
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
    """Forward of the fused adapter on the PyTorch path; x is [T, K], result [T, N] in x.dtype."""
    out_dtype = x.dtype
    cd = _compute_dtype(x.dtype)
    x, D, b_D, C, q, alpha, U, b_U = (t.to(cd) for t in (x, D, b_D, C, q, alpha, U, b_U))
    _, z = _hidden(x, D, b_D)
    u, _ = _mix(z, C, q, alpha)
    W = _out_weight(U, b_U, scale)
    if residual is None:
        out = torch.mm(_augment(u), W)
    else:
        out = torch.addmm(residual.to(cd), _augment(u), W)
    return out.to(out_dtype)


def _mix_backward(
    du: Tensor, z: Tensor, Y: Tensor | None, C: Tensor, q: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients through u = z + sum_b alpha_b (z C_b + q_b): (dz, dC, dq, dalpha)."""
    T, r = z.shape
    n = C.shape[0]
    if Y is None:  # per-layer alpha: dC, dq, dz through G = z^T du (r x r) and the folded M'
        # dalpha per token first, then summed over tokens: <z^T du, C_b>_F is the same number
        # but re-associates a long cancelling sum (measured: ~30 ulps off in fp32; CPU bmm of
        # these skinny shapes lost ~20 ulps too, hence the elementwise product); the extra
        # GEMM (T x r x n*r) is small next to the K*r and r*N ones.
        Yq = torch.mm(z, _branch_cat(C)).view(T, n, r).add_(q)
        dalpha = (Yq * du.unsqueeze(1)).sum((0, 2))
        G = torch.mm(z.t(), du)
        dC = alpha.view(n, 1, 1) * G
        dq = alpha.view(n, 1) * du.sum(0)
        dz = torch.addmm(du, du, torch.einsum("b,bij->ji", alpha, C))
        return dz, dC, dq, dalpha
    dalpha = (Y * du.unsqueeze(1)).sum(2)  # [T, n]; elementwise, not bmm: see above
    A = (alpha.unsqueeze(2) * du.unsqueeze(1)).view(T, n * r)  # alpha_b,t * du_t
    dC = torch.mm(z.t(), A).view(r, n, r).permute(1, 0, 2).contiguous()
    dq = A.view(T, n, r).sum(0)
    dz = torch.addmm(du, A, _branch_cat(C).t())
    return dz, dC, dq, dalpha


def torch_backward(
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
) -> _Grads:
    """(dx, dD, db_D, dC, dq, dalpha, dU, db_U) for upstream `grad` [T, N]; recomputes z.

    dresidual is `grad` itself and is not returned. dx is None when `need_dx` is False.
    """
    dtypes = [t.dtype for t in (x, D, b_D, C, q, alpha, U, b_U)]
    cd = _compute_dtype(x.dtype)
    x, D, b_D, C, q, alpha, U, b_U = (t.to(cd) for t in (x, D, b_D, C, q, alpha, U, b_U))
    g = grad.to(cd)
    h, z = _hidden(x, D, b_D)
    u, Y = _mix(z, C, q, alpha)
    dW = torch.mm(_augment(u).t(), g).mul_(scale)  # [r+1, N]: dU rows, then db_U
    du = torch.mm(g, U.t()).mul_(scale)
    del u
    dz, dC, dq, dalpha = _mix_backward(du, z, Y, C, q, alpha)
    dh = torch.ops.aten.gelu_backward(dz, h)
    del dz, z, h
    dD = torch.mm(x.t(), dh)
    dx = torch.mm(dh, D.t()) if need_dx else None
    grads = (dx, dD, dh.sum(0), dC, dq, dalpha, dW[:-1], dW[-1].clone())  # no aliasing
    return tuple(  # type: ignore[return-value]
        None if gr is None else gr.to(dt) for gr, dt in zip(grads, dtypes)
    )
