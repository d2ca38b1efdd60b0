"""PyTorch path of the fused adapter (the CPU path): fold the branches, two GEMMs, hand backward.

Math (DESIGN.md section 3), x: [T, K], D: [K, r], C: [n, r, r], q: [n, r], U: [r, N]:

    h = x @ D + b_D,   z = gelu(h),   y_b = z @ C_b + q_b
    u = z + sum_b alpha_b * y_b,      out = residual + s * (u @ U + b_U)

Forward, per-layer alpha ([n]): everything after z is affine in z, so it folds into one
r x N matrix and one N-vector before any token is touched (r*r*N work, T-independent):

    M = I + sum_b alpha_b C_b,  q' = sum_b alpha_b q_b
    out = residual + z @ W + c,  W = s * M @ U,  c = s * (q' @ U + b_U)

so the forward is exactly the two GEMMs x @ D and z @ W plus the GELU, then `out += residual`.
(Measured, MKL one thread, T=4096, N=768: `addmm(c, z, W).add_(residual)` 4.2 ms, while
`addmm(residual, z, W)` or `(residual + c).addmm_(z, W)` - a full [T, N] GEMM input, beta=1 -
take 8.8 ms.) Per-token alpha ([T, n]) cannot fold;
all branches go through one GEMM against C_cat = [C_1 | ... | C_n] (r x n*r), mixed per token.

Memory traffic (forward, elements): read x (T*K), write h and z (2*T*r: rank-sized, 1/K of
x), read residual and write out (2*T*N) - the two bare GEMMs plus the residual read.

Backward (g = d out), derived by hand; z is *recomputed* from x, never saved:
    dU = s u^T g,  db_U = s sum_t g_t,  du = s g U^T
    dalpha_b = sum_t <du_t, z_t C_b + q_b> = <z^T du, C_b>_F + <sum_t du_t, q_b>  (per layer)
    dC_b = z^T (alpha_b du),  dq_b = sum_t alpha_b,t du_t
    dz = du + sum_b (alpha_b du) C_b^T          (per layer: du @ M^T)
    dh = dz * gelu'(h),  dD = x^T dh,  db_D = sum_t dh_t,  dx = dh D^T,  dresidual = g
Per layer, G = z^T du (r x r) is accumulated in fp64: dalpha is a strongly cancelling sum
(|result| ~ 1/25 of sum|terms| in the tests), and an fp32 G lost ~30 ulps of it; fp64 costs
~0.3 ms at T=4096, less than the per-token route. Traffic: x read twice (recompute, dD), g
three times (dU, db_U, du), dx written once. (Operand layouts - D vs a contiguous D^T etc. -
measured within noise of each other with MKL on one thread, so no copies are made for them;
a transposing copy of D alone costs 35-60 us, as much as the whole T=1 forward.)
fp16/bf16 inputs are computed in fp32 (CPUs have no fast half GEMM; fp32 accumulation is the
contract) and rounded once on the way out.
"""

from __future__ import annotations

import torch
from torch import Tensor

_Grads = tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
_gelu = torch.nn.functional.gelu


def _upcast(*ts: Tensor) -> list[Tensor]:
    """fp16/bf16 -> fp32 (compute dtype); other dtypes untouched (no op when already fp32)."""
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in ts]


def _fold(C: Tensor, q: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Per-layer alpha: M = I + sum_b alpha_b C_b (r x r) and q' = sum_b alpha_b q_b."""
    n, r, _ = C.shape
    M = torch.mm(alpha.unsqueeze(0), C.reshape(n, r * r)).view(r, r)
    M.diagonal().add_(1.0)
    return M, alpha @ q


def _branch_cat(C: Tensor) -> Tensor:
    """[n, r, r] -> C_cat [r, n*r] with C_cat[:, b*r:(b+1)*r] = C_b."""
    n, r, _ = C.shape
    return C.permute(1, 0, 2).reshape(r, n * r)


def _mix_tokens(z: Tensor, C: Tensor, q: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token alpha: u = z + sum_b alpha_tb (z C_b + q_b) and Y = [y_1..y_n] ([T, n, r])."""
    T, r = z.shape
    Y = torch.mm(z, _branch_cat(C)).view(T, C.shape[0], r).add_(q)
    return (alpha.unsqueeze(2) * Y).sum(1).add_(z), Y


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
    x, D, b_D, C, q, alpha, U, b_U = _upcast(x, D, b_D, C, q, alpha, U, b_U)
    z = _gelu(torch.addmm(b_D, x, D))
    if alpha.dim() == 1:
        M, q_fold = _fold(C, q, alpha)
        W = torch.mm(M, U).mul_(scale)  # s * M @ U
        c = torch.addmv(b_U, U.t(), q_fold, beta=scale, alpha=scale)  # s * (q' @ U + b_U)
    else:
        z, _ = _mix_tokens(z, C, q, alpha)  # z now holds u
        W, c = U * scale, b_U * scale
    out = torch.addmm(c, z, W)  # broadcast bias: MKL's beta=0 path
    if residual is not None:
        out.add_(_upcast(residual)[0])
    return out.to(out_dtype)


def _mix_backward_layer(
    du: Tensor, z: Tensor, M: Tensor, C: Tensor, q: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-layer alpha: (dz, dC, dq, dalpha) through G = z^T du, accumulated in fp64."""
    n = C.shape[0]
    G = torch.mm(z.t().double(), du.double())
    s_du = du.sum(0)
    dalpha = ((G.unsqueeze(0) * C).sum((1, 2)) + q.double() @ s_du.double()).to(du.dtype)
    dC = (alpha.view(n, 1, 1).double() * G).to(du.dtype)
    return torch.mm(du, M.t()), dC, alpha.view(n, 1) * s_du, dalpha


def _mix_backward_tokens(
    du: Tensor, z: Tensor, Y: Tensor, C: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token alpha: (dz, dC, dq, dalpha[T, n]) through A = alpha_tb * du_t."""
    T, r = z.shape
    n = C.shape[0]
    dalpha = (Y * du.unsqueeze(1)).sum(2)  # elementwise: CPU bmm of these shapes lost ~20 ulps
    A = (alpha.unsqueeze(2) * du.unsqueeze(1)).view(T, n * r)
    dC = torch.mm(z.t(), A).view(r, n, r).permute(1, 0, 2).contiguous()
    dz = torch.addmm(du, A, _branch_cat(C).t())
    return dz, dC, A.view(T, n, r).sum(0), dalpha


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
    x, D, b_D, C, q, alpha, U, b_U, g = _upcast(x, D, b_D, C, q, alpha, U, b_U, grad)
    h = torch.addmm(b_D, x, D)
    z = _gelu(h)
    if alpha.dim() == 1:
        M, q_fold = _fold(C, q, alpha)
        u = torch.addmm(q_fold, z, M)
    else:
        u, Y = _mix_tokens(z, C, q, alpha)
    dU = torch.mm(u.t(), g).mul_(scale)
    db_U = g.sum(0).mul_(scale)
    du = torch.mm(g, U.t()).mul_(scale)
    del u
    if alpha.dim() == 1:
        dz, dC, dq, dalpha = _mix_backward_layer(du, z, M, C, q, alpha)
    else:
        dz, dC, dq, dalpha = _mix_backward_tokens(du, z, Y, C, alpha)
    dh = torch.ops.aten.gelu_backward(dz, h)
    del dz, z, h
    dD = torch.mm(x.t(), dh)
    dx = torch.mm(dh, D.t()) if need_dx else None
    grads = (dx, dD, dh.sum(0), dC, dq, dalpha, dU, db_U)
    return tuple(  # type: ignore[return-value]
        None if gr is None else gr.to(dt) for gr, dt in zip(grads, dtypes)
    )
