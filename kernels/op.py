"""torch.library registration, dispatch and FLOP formula of the fused adapter op.

`torch.ops.edgetune.fused_adapter` (forward) and `torch.ops.edgetune.fused_adapter_backward`
are custom ops with fake (meta) implementations, so torch.compile and torch.export trace them
as single opaque nodes; autograd is wired with `register_autograd` (saves only the inputs and
parameters: every path recomputes z in the backward).

Dispatch: CUDA tensors -> Triton, CPU tensors -> the PyTorch path. `EDGETUNE_KERNEL=triton|
torch|reference` forces a path (read at call time); a forced path that cannot run raises, it is
never replaced by another. An automatic choice is logged once per (path, device type).
Triton on CPU tensors runs only when forced and only under TRITON_INTERPRET=1 (tests).
"""

import logging
import os
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .reference import reference_backward, reference_fp64
from .torch_path import torch_backward, torch_forward, torch_forward_saving

log = logging.getLogger("edgetune.kernels")

KERNEL_ENV = "EDGETUNE_KERNEL"
PATHS = ("triton", "torch", "reference")
_logged: set[tuple[str, str]] = set()


def _triton_module():
    """The Triton implementation module, or None when triton is not installed."""
    try:
        from . import triton_path
    except ImportError:  # the `triton` extra is optional; auto-dispatch logs it, forcing raises
        return None
    return triton_path


def triton_can_run(device: torch.device) -> bool:
    """Whether the Triton kernels can launch on tensors of `device` in this process."""
    mod = _triton_module()
    if mod is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and mod.INTERPRETED)


def active_path(device: torch.device | str = "cpu") -> str:
    """Which implementation a call with tensors on `device` runs: triton | torch | reference.

    Raises if `EDGETUNE_KERNEL` names an unknown path or one that cannot run on `device`.
    """
    device = torch.device(device)
    forced = os.environ.get(KERNEL_ENV, "").strip().lower()
    if forced:
        if forced not in PATHS:
            raise ValueError(f"{KERNEL_ENV}={forced!r}: expected one of {PATHS}")
        if forced == "triton" and not triton_can_run(device):
            raise RuntimeError(
                f"{KERNEL_ENV}=triton cannot run on {device.type} tensors: needs triton and a CUDA "
                "device, or CPU tensors with TRITON_INTERPRET=1 set before edgetune.kernels loads"
            )
        return forced
    return "triton" if device.type == "cuda" and triton_can_run(device) else "torch"


def _resolve(device: torch.device) -> str:
    path = active_path(device)
    key = (path, device.type)
    if not os.environ.get(KERNEL_ENV) and key not in _logged:
        _logged.add(key)
        log.info("edgetune.kernels.fused_adapter: %s path on %s tensors", path, device.type)
    return path


def _forward_impl(path: str) -> Callable[..., Tensor]:
    if path == "triton":
        return _triton_module().triton_forward
    return torch_forward if path == "torch" else reference_fp64


def _forward_saving_impl(path: str) -> Callable[..., tuple[Tensor, tuple[Tensor, ...]]] | None:
    """Forward that also returns rank-sized tensors for its backward (`saved=`), or None."""
    if path == "triton":
        return _triton_module().triton_forward_saving
    return torch_forward_saving if path == "torch" else None


def _backward_impl(path: str) -> Callable[..., tuple[Tensor | None, ...]]:
    if path == "triton":
        return _triton_module().triton_backward
    return torch_backward if path == "torch" else reference_backward


@torch.library.custom_op("edgetune::fused_adapter", mutates_args=())
def fused_adapter_op(
    x: Tensor,
    D: Tensor,
    b_D: Tensor,
    C: Tensor,
    q: Tensor,
    alpha: Tensor,
    U: Tensor,
    b_U: Tensor,
    scale: float,
    residual: Tensor | None,
) -> Tensor:
    """residual + scale * (u @ U + b_U) for x [T, d_in]; see edgetune.kernels.fused_adapter."""
    fwd = _forward_impl(_resolve(x.device))
    return fwd(x, D, b_D, C, q, alpha, U, b_U, scale, residual)


@fused_adapter_op.register_fake
def _(x, D, b_D, C, q, alpha, U, b_U, scale, residual):
    return x.new_empty(x.shape[0], U.shape[1])


@torch.library.custom_op("edgetune::fused_adapter_backward", mutates_args=())
def fused_adapter_backward_op(
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
    need_dx: bool,
) -> list[Tensor]:
    """[dx, dD, db_D, dC, dq, dalpha, dU, db_U]; dx is an empty tensor when not need_dx."""
    bwd = _backward_impl(_resolve(x.device))
    dx, *rest = bwd(grad, x, D, b_D, C, q, alpha, U, b_U, scale, need_dx=need_dx)
    return [x.new_empty(0) if dx is None else dx, *rest]


@fused_adapter_backward_op.register_fake
def _(grad, x, D, b_D, C, q, alpha, U, b_U, scale, need_dx):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    return [dx, *(torch.empty_like(t) for t in (D, b_D, C, q, alpha, U, b_U))]


def _setup_context(ctx, inputs, output) -> None:
    x, D, b_D, C, q, alpha, U, b_U, scale, residual = inputs
    ctx.save_for_backward(x, D, b_D, C, q, alpha, U, b_U)  # never z: every path recomputes it
    ctx.scale = scale
    ctx.has_residual = residual is not None


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    need_dx = bool(ctx.needs_input_grad[0])
    grads = torch.ops.edgetune.fused_adapter_backward(grad, *ctx.saved_tensors, ctx.scale, need_dx)
    # d residual = grad itself: the residual enters the output with weight 1
    return (grads[0] if need_dx else None, *grads[1:], None, grad if ctx.has_residual else None)


fused_adapter_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Eager fast path. Calling a torch.library custom op from Python costs ~75 us forward and
# ~0.3 ms forward+backward on this CPU (dispatcher round trips, the generated autograd node,
# schema checks), which is as much as the whole adapter at T=512, d=384. In plain eager mode
# the public wrapper therefore runs the *same* implementations through this autograd.Function;
# whenever anything could be watching (torch.compile / export, FlopCounterMode or any other
# dispatch or torch-function mode, functorch transforms, jit tracing) it calls the registered
# op instead, so tracers see one opaque node and the FLOP formula applies.
# ---------------------------------------------------------------------------------------------


def eager_fast_path_ok() -> bool:
    """True when nothing traces or intercepts ops, so the custom-op indirection can be skipped."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or torch.jit.is_tracing()
    )


def eager_forward(
    x: Tensor,
    D: Tensor,
    b_D: Tensor,
    C: Tensor,
    q: Tensor,
    alpha: Tensor,
    U: Tensor,
    b_U: Tensor,
    scale: float,
    residual: Tensor | None,
) -> Tensor:
    """Forward only (no autograd node), through the dispatched implementation."""
    return _forward_impl(_resolve(x.device))(x, D, b_D, C, q, alpha, U, b_U, scale, residual)


class EagerFusedAdapter(torch.autograd.Function):
    """autograd.Function over the dispatched implementations (see eager_fast_path_ok).

    The torch path also saves h = x @ D + b_D and [gelu(h) | 1] (two [T, r] tensors, each r/d_in
    of x) so its backward skips one of five skinny GEMMs and the GELU; the Triton path saves h
    (fp32) so its backward never re-reads x for it; the reference path saves only inputs.
    """

    @staticmethod
    def forward(ctx, x, D, b_D, C, q, alpha, U, b_U, scale, residual):
        ctx.path = _resolve(x.device)
        ctx.scale = scale
        ctx.has_residual = residual is not None
        args = (x, D, b_D, C, q, alpha, U, b_U)
        saving = _forward_saving_impl(ctx.path)
        if saving is None:
            ctx.save_for_backward(*args)
            return _forward_impl(ctx.path)(*args, scale, residual)
        out, extra = saving(*args, scale, residual)
        ctx.save_for_backward(*args, *extra)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        need_dx = bool(ctx.needs_input_grad[0])
        inputs, extra = ctx.saved_tensors[:8], ctx.saved_tensors[8:]
        kwargs = {"saved": tuple(extra)} if extra else {}
        bwd = _backward_impl(ctx.path)
        grads = bwd(grad, *inputs, ctx.scale, need_dx=need_dx, **kwargs)
        return (*grads, None, grad if ctx.has_residual else None)


# ---------------------------------------------------------------------------------------------
# FLOP formula (GEMM FLOPs only, FlopCounterMode's convention: elementwise work is not counted).
# Forward, the three GEMM stages of the math:
#   x @ D: 2*T*K*r,   z @ C_b for every branch: 2*T*n*r*r,   u @ U: 2*T*r*N
#   => F = 2*T*(K*r + n*r*r + r*N)
# Backward, derived stage by stage (g = d out):
#   recompute (z is not saved): x @ D and z @ C_b again      2*T*(K*r + n*r*r)
#   dU = u^T g and du = g U^T                                 2 * 2*T*r*N
#   dC_b = z^T (alpha_b du) and dz += (alpha_b du) C_b^T      2 * 2*T*n*r*r
#   dD = x^T dh                                               2*T*K*r
#   dx = dh D^T  (only when x needs a gradient)               2*T*K*r
#   => B = 2*T*(3*K*r + 3*n*r*r + 2*r*N)  (minus 2*T*K*r without dx), i.e. 2F + the recompute.
# These are the algorithm's counts, the same for every path: the CPU path with per-layer alpha
# does fewer (it folds the branches into one r x r matrix), the Triton backward recomputes the
# branch products once more for dalpha (n*r*r per token, small next to K*r).
# ---------------------------------------------------------------------------------------------


def adapter_flops(T: int, d_in: int, r: int, n_branch: int, d_out: int) -> int:
    """Forward GEMM FLOPs of the fused adapter: 2*T*(d_in*r + n*r*r + r*d_out)."""
    return 2 * T * (d_in * r + n_branch * r * r + r * d_out)


def adapter_backward_flops(
    T: int, d_in: int, r: int, n_branch: int, d_out: int, need_dx: bool = True
) -> int:
    """Backward GEMM FLOPs (with the z recompute): 2*T*(3*d_in*r + 3*n*r*r + 2*r*d_out)."""
    flops = 2 * T * (3 * d_in * r + 3 * n_branch * r * r + 2 * r * d_out)
    return flops if need_dx else flops - 2 * T * d_in * r


@register_flop_formula(torch.ops.edgetune.fused_adapter)
def _fwd_flop_formula(x_shape, D_shape, b_D_shape, C_shape, *args, out_shape=None, **kwargs) -> int:
    T, d_in = x_shape
    return adapter_flops(T, d_in, D_shape[1], C_shape[0], out_shape[1])


@register_flop_formula(torch.ops.edgetune.fused_adapter_backward)
def _bwd_flop_formula(
    grad_shape,
    x_shape,
    D_shape,
    b_D_shape,
    C_shape,
    q_shape,
    alpha_shape,
    U_shape,
    b_U_shape,
    scale,
    need_dx,
    *args,
    **kwargs,
) -> int:
    T, d_in = x_shape
    return adapter_backward_flops(T, d_in, D_shape[1], C_shape[0], U_shape[1], need_dx)
