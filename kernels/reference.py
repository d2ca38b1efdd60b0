"""Plain reference for the fused adapter: a loop over branches, as a user would write it.

This is the test oracle (run in fp64) and, run in a low dtype, the "plain PyTorch composition"
whose error sets the tolerance for the fused paths (DESIGN.md section 5). It is differentiable
through ordinary autograd and deliberately does nothing clever: no folding, no recompute.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def reference_adapter(
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
    """`residual + scale * (u @ U + b_U)` with `u = z + sum_b alpha_b (z @ C_b + q_b)`.

    Runs in the dtype of its inputs; x is `[T, d_in]`, alpha `[n]` or `[T, n]`.
    """
    z = F.gelu(x @ D + b_D)  # exact (erf) GELU
    u = z
    for b in range(C.shape[0]):
        a_b = alpha[b] if alpha.dim() == 1 else alpha[:, b : b + 1]
        u = u + a_b * (z @ C[b] + q[b])
    delta = scale * (u @ U + b_U)
    return delta if residual is None else residual + delta


def reference_fp64(
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
    """The reference computed in fp64, returned in the dtype of `x` (the forced `reference` path)."""
    args = [t.double() for t in (x, D, b_D, C, q, alpha, U, b_U)]
    res = None if residual is None else residual.double()
    return reference_adapter(*args, scale, res).to(x.dtype)


def reference_backward(
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
) -> tuple[Tensor | None, ...]:
    """(dx, dD, db_D, dC, dq, dalpha, dU, db_U) computed in fp64, cast back.

    Uses the hand-derived formulas of the PyTorch path (gradchecked against autograd through
    `reference_adapter` in the tests) rather than autograd itself: this runs inside a
    torch.library op, below the autograd dispatch key, where autograd cannot record.
    """
    from .torch_path import torch_backward

    inputs = (x, D, b_D, C, q, alpha, U, b_U)
    grads = torch_backward(grad.double(), *(t.double() for t in inputs), scale, need_dx)
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs))
