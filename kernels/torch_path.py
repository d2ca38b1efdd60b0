"""PyTorch path of the fused adapter (the CPU path): fold the branches, two GEMMs, hand backward.

Math (DESIGN.md section 3), x: [T, K], D: [K, r], C: [n, r, r], q: [n, r], U: [r, N]:

    h = x @ D + b_D,   z = gelu(h),   y_b = z @ C_b + q_b
    u = z + sum_b alpha_b * y_b,      out = residual + s * (u @ U + b_U)

Forward, per-layer alpha ([n]): everything after z is affine in z, so it folds into one
(r+1) x N matrix before any token is touched (r*r*N work, T-independent):

    M1 = [M ; q'],  M = I + sum_b alpha_b C_b,  q' = sum_b alpha_b q_b   (u = [z | 1] @ M1)
    out = residual + z1 @ W1,  z1 = [z | 1],  W1 = s * M1 @ U + [0 ; s * b_U]

so the forward is exactly the two GEMMs x @ D and z1 @ W1 plus the GELU, then `out +=
residual`; the bias rides on z1's ones column (MKL, one thread, T=4096, N=384: a broadcast
bias through addmm costs a [T, N] pass, 2.6 ms against 1.4 ms for z1 @ W1; `addmm(residual,
z1, W1)` - beta=1 - took 2.8 ms against 2.3 ms for `mm(z1, W1).add_(residual)`).
Per-token alpha ([T, n]) cannot fold; all branches go through one GEMM against
C_cat = [C_1 | ... | C_n] (r x n*r), mixed per token.
The forward also returns h and z1 ([T, r] and [T, r+1], 1/K of x, kept in fp32): the eager
autograd path saves them, so the backward neither repeats x @ D nor the GELU (the registered
op, which saves only inputs, recomputes them with the same calls, bitwise equal).

Backward (g = d out), derived by hand from h, z1 (saved or recomputed):
    dU = s u^T g,  db_U = s sum_t g_t,  du = s g U^T
    dalpha_b = sum_t <du_t, z_t C_b + q_b> = <z^T du, C_b>_F + <sum_t du_t, q_b>  (per layer)
    dC_b = z^T (alpha_b du),  dq_b = sum_t alpha_b,t du_t
    dz = du + sum_b (alpha_b du) C_b^T          (per layer: du @ M^T)
    dh = dz * gelu'(h),  dD = x^T dh,  db_D = sum_t dh_t,  dx = dh D^T,  dresidual = g
Per layer, neither u nor du is ever formed. One GEMM over g gives A1 = z1^T g = [z^T g ;
sum_t g_t]; everything else about the branches is rank-sized algebra on it:
    dU = s M1^T A1,  db_U = s A1[r],  G1 = z1^T du = s A1 U^T = [z^T du ; sum_t du_t]
and a second GEMM over g gives dz = du M^T = g (s M U)^T against an [N, r] matrix formed once.
G1 ([r+1, N] x [N, r]) and dalpha are computed in fp64: dalpha is a strongly cancelling sum
(|result| ~ 1/25 of sum|terms| in the tests); at this size fp64 costs microseconds. The
earlier form, G1 = z1^T du over T tokens, needed du ([T, r]), its scale pass, fp64 copies of
z1 and du and an fp64 GEMM (~0.5 ms at T=4096), and dz = du M^T was one more T-sized GEMM.
Big GEMMs (T x {K, N} x r): forward 2 (x@D, z1@W1), backward 4 (A1, dz, dD, dx) - the count
of the unfused composition, with its elementwise [T, N] passes (scale, bias, residual, their
backward) folded away (tests/kernels/test_op.py counts them). Traffic: x read once, g twice
(A1, dz), dx written once; forward: x read once, out written by the GEMM, then read again
with the residual for the add. dD is computed as (dh^T x)^T: MKL's x^T @ dh took 2.7 ms against
1.2 ms for this layout (T=4096, K=384, r=32, one thread).
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
    return [t if t.dtype == cd else t.to(cd) for t in (x, *ts)]  # skips ~17 no-op dispatches


def _fold(C: Tensor, q: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Per-layer alpha: M1 = [M ; q'] ([r+1, r]), M = I + sum_b alpha_b C_b, q' = sum_b alpha_b q_b,
    and Cq ([n, (r+1) r]: row b is [C_b ; q_b] flattened, so M1 = I' + alpha @ Cq).

    The stacked form matches z1 = [z | 1]: z1 @ M1 = z M + q' = u, in one r-sized product.
    """
    n, r, _ = C.shape
    Cq = torch.cat([C.reshape(n, r * r), q], 1)
    M1 = torch.mm(alpha.unsqueeze(0), Cq).view(r + 1, r)
    M1[:r].diagonal().add_(1.0)
    return M1, Cq


def _fold_up(C: Tensor, q: Tensor, alpha: Tensor, U: Tensor, b_U: Tensor, s: float) -> Tensor:
    """W1 = [s M U ; s (q' U + b_U)] ([r+1, N]): out = z1 @ W1 with z1 = [z | 1].

    The bias rides on z1's ones column: a separate broadcast bias costs MKL a [T, N] pass
    (addmm with a vector bias measured 2.6 ms against 1.4 ms for this GEMM, T=4096, N=384).
    """
    W1 = torch.mm(_fold(C, q, alpha)[0], U).mul_(s)
    W1[-1].add_(b_U, alpha=s)
    return W1


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
    if alpha.dim() == 1:
        out = torch.mm(z1, _fold_up(C, q, alpha, U, b_U, scale))  # bias rides on z1's ones
    else:
        u, _ = _mix_tokens(z1[:, :-1], C, q, alpha)
        out = torch.addmm(b_U, u, U, alpha=scale, beta=scale)
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
    """Per-layer alpha: (dz, dC, dq, dalpha, dU, db_U) from two GEMMs over g; du is never formed.

    A1 = z1^T g is the only T-sized reduction: dU = s M1^T A1, db_U = s A1[r], and
    G1 = z1^T du = s A1 U^T (an [r+1, N] x [N, r] product, in fp64: dalpha cancels).
    dz = du M^T = g (s M U)^T: one GEMM against a pre-multiplied [N, r] matrix.
    """
    n, r, _ = C.shape
    M1, Cq = _fold(C, q, alpha)
    A1 = torch.mm(z1.t(), g)  # [z^T g ; sum_t g_t]: one pass over g
    dU = torch.mm(M1.t(), A1).mul_(scale)  # s u^T g with u = z1 M1
    dz = torch.mm(g, torch.mm(U.t(), M1[:r].t()).mul_(scale))  # g (s M U)^T
    G1 = torch.mm(A1.double(), U.t().double()).mul_(scale)  # [z^T du ; sum_t du_t]
    dalpha = torch.mv(Cq.double(), G1.view(-1)).to(dz.dtype)  # <G, C_b>_F + <sum du, q_b>
    G1 = G1.to(dz.dtype)
    dC = alpha.view(n, 1, 1) * G1[:r]
    return dz, dC, alpha.view(n, 1) * G1[r], dalpha, dU, A1[r].mul(scale)


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
    dD = torch.mm(dh.t(), x).t().contiguous()  # the fast MKL layout (module docstring)
    dx = torch.mm(dh, D.t()) if need_dx else None
    grads = (dx, dD, dh.sum(0), dC, dq, dalpha, dU, db_U)
    return tuple(  # type: ignore[return-value]
        None if gr is None else gr.to(dt) for gr, dt in zip(grads, dtypes)
    )
