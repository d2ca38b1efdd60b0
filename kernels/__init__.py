"""edgetune.kernels: the fused multi-branch adapter op (Triton + PyTorch paths).

    from edgetune.kernels import fused_adapter, active_path
    out = fused_adapter(x, D, b_D, C, q, alpha, U, b_U, scale, residual=ffn_out)

Dispatch (DESIGN.md section 5): CUDA -> Triton, CPU -> PyTorch path; `EDGETUNE_KERNEL=triton|
torch|reference` forces a path (and raises if it cannot run); `active_path(device)` tells which
one a call would take.
"""

import torch
from torch import Tensor

from .op import (
    KERNEL_ENV,
    PATHS,
    EagerFusedAdapter,
    active_path,
    adapter_backward_flops,
    adapter_flops,
    eager_fast_path_ok,
    eager_forward,
)
from .reference import reference_adapter

__all__ = [
    "KERNEL_ENV",
    "PATHS",
    "active_path",
    "adapter_backward_flops",
    "adapter_flops",
    "eager_fast_path_ok",
    "fused_adapter",
    "reference_adapter",
]


def fused_adapter(
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
    """`residual + scale * (u @ U + b_U)` (or the delta alone), u the mixed branch activations.

    x: [..., d_in] (leading dims are flattened to T tokens), D: [d_in, r], b_D: [r],
    C: [n, r, r], q: [n, r], alpha: [n] (per layer) or [..., n] (per token, same leading dims as
    x), already normalised by the caller; U: [r, d_out], b_U: [d_out]; residual: [..., d_out].
    Math: z = gelu(x @ D + b_D) (exact erf), u = z + sum_b alpha_b (z @ C_b + q_b).
    Parameters may have another floating dtype than x (e.g. fp32 master weights beside bf16
    activations): every path computes in x's precision (fp32 accumulation) and returns each
    parameter's gradient in the parameter's own dtype, accumulated in fp32 and never rounded
    through x's dtype. The residual must already have x's dtype. Returns x.dtype, [..., d_out].
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if alpha.dim() > 1:
        alpha = alpha.reshape(-1, alpha.shape[-1])
    params = (D, b_D, C, q, alpha, U, b_U)
    if not all(t.is_floating_point() for t in params):
        raise TypeError("fused_adapter: parameters must be floating point")
    res2 = None
    if residual is not None:
        if residual.dtype != x.dtype:
            raise TypeError(f"fused_adapter: residual dtype {residual.dtype} != x dtype {x.dtype}")
        res2 = residual.reshape(-1, residual.shape[-1])
    if eager_fast_path_ok():  # same implementations, minus the custom-op indirection (op.py)
        args = (x2, *params, float(scale), res2)
        tensors = (x2, *params) if res2 is None else (x2, *params, res2)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            out = EagerFusedAdapter.apply(*args)
        else:  # inference: no autograd node to build
            out = eager_forward(*args)
    else:
        out = torch.ops.edgetune.fused_adapter(x2, *params, float(scale), res2)
    return out.reshape(*lead, out.shape[-1])
