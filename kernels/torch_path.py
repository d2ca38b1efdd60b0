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
The forward also returns h ([T, r], 1/K of x, kept in fp32): the eager autograd path saves it,
so the backward does not repeat the x @ D GEMM (the registered op, which saves only inputs,
recomputes it with the same call, bitwise equal).

Memory traffic (forward, elements): read x (T*K), write h and z (2*T*r: rank-sized, 1/K of
x), read residual and write out (2*T*N) - the two bare GEMMs plus the residual read.

Backward (g = d out), derived by hand from h (saved or recomputed):
    dU = s u^T g,  db_U = s sum_t g_t,  du = s g U^T
    dalpha_b = sum_t <du_t, z_t C_b + q_b> = <z^T du, C_b>_F + <sum_t du_t, q_b>  (per layer)
    dC_b = z^T (alpha_b du),  dq_b = sum_t alpha_b,t du_t
    dz = du + sum_b (alpha_b du) C_b^T          (per layer: du @ M^T)
    dh = dz * gelu'(h),  dD = x^T dh,  db_D = sum_t dh_t,  dx = dh D^T,  dresidual = g
Per layer, u = z M + q' is never formed: with z1 = [z | 1] ([T, r+1]) one GEMM over g gives
A1 = z1^T g = [z^T g ; sum_t g_t] (db_U rides along: no separate pass over g), and
dU = s [M ; q'^T]^T A1 is an r x (r+1) x N product. G1 = z1^T du = [z^T du ; sum_t du_t] is
accumulated in fp64: dalpha is a strongly cancelling sum (|result| ~ 1/25 of sum|terms| in the
tests), and an fp32 G lost ~30 ulps of it; fp64 costs ~0.3 ms at T=4096.
Big GEMMs (T x {K, N} x r): forward 2 (x@D, z@W), backward 4 (A1, du, dD, dx) - the count of
the unfused composition, with its elementwise [T, N] passes (scale, bias, residual, their
backward) folded away. Traffic: x read once, g twice (A1, du), dx written once.
fp16/bf16 inputs are computed in fp32 (CPUs have no fast half GEMM; fp32 accumulation is the
contract) and rounded once on the way out; weight gradients are returned in the parameters'
own dtype (fp32 parameters get fp32 gradients even for half activations).
"""

from __future__ import annotations

import torch
from torch import Tensor

_Grads = tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
_gelu = torch.nn.functional.gelu


def _upcast(x: Tensor, *ts: Tensor) -> list[Tensor]:
    """x and `ts` in the compute dtype: fp32 for fp16/bf16 x, else x.dtype (no op when equal).

    Parameters may come in another dtype than x (fp32 master weights beside bf16 activations).
    """
    cd = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return [t.to(cd) for t in (x, *ts)]


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


def torch_forward_saving(
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
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """(out [T, N] in x.dtype, (h, z1)): h = x @ D + b_D and z1 = [gelu(h) | 1], compute dtype."""
    out_dtype = x.dtype
    x, D, b_D, C, q, alpha, U, b_U = _upcast(x, D, b_D, C, q, alpha, U, b_U)
    h, z1 = _hidden(x, D, b_D)
    z = z1[:, :-1]
    if alpha.dim() == 1:
        M, q_fold = _fold(C, q, alpha)
        W = torch.mm(M, U).mul_(scale)  # s * M @ U
        c = torch.addmv(b_U, U.t(), q_fold, beta=scale, alpha=scale)  # s * (q' @ U + b_U)
    else:
        z, _ = _mix_tokens(z, C, q, alpha)  # z now holds u
        W, c = U * scale, b_U * scale
    out = torch.addmm(c, z, W)  # broadcast bias: MKL's beta=0 path
    if residual is not None:
        out.add_(residual)  # in place; a half residual is promoted element by element
    return out.to(out_dtype), (h, z1)


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
    return torch_forward_saving(x, D, b_D, C, q, alpha, U, b_U, scale, residual)[0]


def _hidden(x: Tensor, D: Tensor, b_D: Tensor) -> tuple[Tensor, Tensor]:
    """h = x @ D + b_D and z1 = [gelu(h) | 1] ([T, r+1]; the ones column lets a GEMM against
    z1 also yield the column sums of its partner: db_U, sum_t du_t)."""
    h = torch.addmm(b_D, x, D)
    z1 = h.new_empty(h.shape[0], h.shape[1] + 1)
    z1[:, :-1] = _gelu(h)
    z1[:, -1] = 1.0
    return h, z1


def _layer_backward(
    g: Tensor, z1: Tensor, C: Tensor, q: Tensor, alpha: Tensor, U: Tensor, scale: float
) -> tuple[Tensor, ...]:
    """Per-layer alpha: (dz, dC, dq, dalpha, dU, db_U); u and sum_t g_t ride on z1 GEMMs."""
    n, r, _ = C.shape
    M, q_fold = _fold(C, q, alpha)
    A1 = torch.mm(z1.t(), g)  # [z^T g ; sum_t g_t]: one pass over g
    dU = torch.mm(torch.cat([M, q_fold.unsqueeze(0)]).t(), A1).mul_(scale)  # s u^T g
    db_U = A1[r].mul(scale)
    du = torch.mm(g, U.t()).mul_(scale)
    G1 = torch.mm(z1.t().double(), du.double())  # [z^T du ; sum_t du_t], fp64 (docstring)
    G, s_du = G1[:r], G1[r]
    dalpha = ((G.unsqueeze(0) * C).sum((1, 2)) + q.double() @ s_du).to(du.dtype)
    dC = (alpha.view(n, 1, 1).double() * G).to(du.dtype)
    dq = alpha.view(n, 1) * s_du.to(du.dtype)
    return torch.mm(du, M.t()), dC, dq, dalpha, dU, db_U


def _tokens_backward(
    g: Tensor, z1: Tensor, C: Tensor, q: Tensor, alpha: Tensor, U: Tensor, scale: float
) -> tuple[Tensor, ...]:
    """Per-token alpha: (dz, dC, dq, dalpha [T, n], dU, db_U) through A = alpha_tb * du_t."""
    T, r = z1.shape[0], z1.shape[1] - 1
    n = C.shape[0]
    z = z1[:, :r]
    u, Y = _mix_tokens(z, C, q, alpha)
    A1 = torch.mm(torch.cat([u, z1[:, r:]], 1).t(), g)  # [u^T g ; sum_t g_t]
    dU, db_U = A1[:r].mul_(scale), A1[r].mul(scale)
    du = torch.mm(g, U.t()).mul_(scale)
    dalpha = (Y * du.unsqueeze(1)).sum(2)  # elementwise: CPU bmm of these shapes lost ~20 ulps
    A = (alpha.unsqueeze(2) * du.unsqueeze(1)).view(T, n * r)
    dC = torch.mm(z.t(), A).view(r, n, r).permute(1, 0, 2).contiguous()
    dz = torch.addmm(du, A, _branch_cat(C).t())
    return dz, dC, A.view(T, n, r).sum(0), dalpha, dU, db_U


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
    saved: tuple[Tensor, Tensor] | None = None,
) -> _Grads:
    """(dx, dD, db_D, dC, dq, dalpha, dU, db_U) for upstream `grad` [T, N].

    `saved` is the forward's (h, z1) (torch_forward_saving); None recomputes them (same calls,
    bitwise equal).
    dresidual is `grad` itself and is not returned. dx is None when `need_dx` is False.
    """
    dtypes = [t.dtype for t in (x, D, b_D, C, q, alpha, U, b_U)]
    x, D, b_D, C, q, alpha, U, b_U, g = _upcast(x, D, b_D, C, q, alpha, U, b_U, grad)
    h, z1 = _hidden(x, D, b_D) if saved is None else saved
    mix = _layer_backward if alpha.dim() == 1 else _tokens_backward
    dz, dC, dq, dalpha, dU, db_U = mix(g, z1, C, q, alpha, U, scale)
    dh = torch.ops.aten.gelu_backward(dz, h)  # dz * gelu'(h), one fused elementwise pass
    del dz
    dD = torch.mm(x.t(), dh)
    dx = torch.mm(dh, D.t()) if need_dx else None
    grads = (dx, dD, dh.sum(0), dC, dq, dalpha, dU, db_U)
    return tuple(  # type: ignore[return-value]
        None if gr is None else gr.to(dt) for gr, dt in zip(grads, dtypes)
    )
