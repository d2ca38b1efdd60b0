"""Shared case builder and error checks for the fused-adapter tests.

The acceptance rule (DESIGN.md section 5): for the forward and every gradient, the fused op's
max-abs error against the fp64 reference is at most RATIO x the error of the plain PyTorch
composition (reference_adapter run in the same low dtype, same rounded inputs), plus a floor.

The floor is FLOOR_ULPS ulps at the tensor's own scale (eps(dtype) * max|ref|). Two reasons:
- a result merely *stored* in dtype carries up to half an ulp of rounding, so where the
  composition happens to be exact (d residual = g passes through; a bias gradient whose sum
  rounds exactly) a correctly rounded fused result would otherwise fail;
- the fused paths re-associate sums on purpose (branch folding M' = sum alpha_b C_b, bias and
  scale inside the GEMM, fp32 partial sums) and some outputs are single, strongly cancelling
  reductions: per-layer dalpha_b = sum over T*r products whose |sum| is ~1/25 of sum|terms| in
  this table, so sub-ulp noise in z, u, du shows up ~25x amplified in ulps of the result, and
  which side of 2x the composition lands on is a coin toss. Measured worst over the full fp32
  table: 8.6 ulps (CPU path, T=1 dalpha), every other tensor <= 2.4 ulps. fp32 therefore gets
  16 ulps (2e-6 relative). fp16/bf16 errors are dominated by the composition's own roundings
  of every intermediate, so 1 ulp suffices there. Any real bug (wrong term, half-precision
  accumulation) shows at >= 1e-3 relative, thousands of ulps above these floors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from edgetune.kernels import fused_adapter, reference_adapter
from torch import Tensor

NAMES = ("x", "D", "b_D", "C", "q", "alpha", "U", "b_U", "residual")
SCALE = 0.75

# per-dtype tolerance table: (max ratio to the composition's error, floor in ulps of max|ref|)
TOLERANCE = {
    torch.float32: (2.0, 16.0),
    torch.float16: (2.0, 1.0),
    torch.bfloat16: (2.0, 1.0),
}


@dataclass(frozen=True)
class Case:
    T: int
    d: int
    r: int
    n: int
    per_token: bool
    residual: bool
    dtype: torch.dtype
    d_out: int | None = None

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        out = "" if self.d_out is None else f"->{self.d_out}"
        alpha = "token" if self.per_token else "layer"
        res = "res" if self.residual else "nores"
        return f"T{self.T}-d{self.d}{out}-r{self.r}-n{self.n}-{alpha}-{res}-{dt}"


def make_inputs(case: Case, seed: int = 0) -> dict[str, Tensor]:
    """fp64 tensors already rounded to case.dtype (so every path sees identical inputs).

    U != 0 and C != 0 (unlike the adapter's init) so every gradient path carries signal.
    """
    g = torch.Generator().manual_seed(seed)
    T, K, r, n = case.T, case.d, case.r, case.n
    N = case.d_out or case.d

    def rnd(*shape: int, std: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    logits = rnd(T, n) if case.per_token else rnd(n)
    t = {
        "x": rnd(T, K),
        "D": rnd(K, r, std=K**-0.5),
        "b_D": rnd(r, std=0.1),
        "C": rnd(n, r, r, std=0.5 * r**-0.5),
        "q": rnd(n, r, std=0.1),
        "alpha": torch.softmax(logits, -1),
        "U": rnd(r, N, std=r**-0.5),
        "b_U": rnd(N, std=0.1),
        "residual": rnd(T, N) if case.residual else None,
        "grad": rnd(T, N),
    }
    return {k: None if v is None else v.to(case.dtype).double() for k, v in t.items()}


def run(fn, inputs: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Forward + backward of `fn` in `dtype`; returns out and the gradient of every input."""
    leaves = {
        k: None if inputs[k] is None else inputs[k].to(dtype, copy=True).requires_grad_()
        for k in NAMES
    }
    out = fn(*(leaves[k] for k in NAMES[:8]), SCALE, leaves["residual"])
    out.backward(inputs["grad"].to(dtype))
    res = {"out": out.detach()}
    res.update({f"d{k}": v.grad for k, v in leaves.items() if v is not None})
    return res


def check_case(case: Case, seed: int = 0) -> None:
    """Assert the acceptance rule for the currently dispatched fused path on one case."""
    inputs = make_inputs(case, seed)
    ref = run(reference_adapter, inputs, torch.float64)
    comp = run(reference_adapter, inputs, case.dtype)
    ours = run(fused_adapter, inputs, case.dtype)
    ratio, floor_ulps = TOLERANCE[case.dtype]
    eps = torch.finfo(case.dtype).eps
    failures = []
    for name, want in ref.items():
        assert ours[name] is not None, f"{case.id}: no gradient for {name}"
        assert ours[name].dtype == case.dtype and ours[name].shape == want.shape, name
        err_ours = (ours[name].double() - want).abs().max().item()
        err_comp = (comp[name].double() - want).abs().max().item()
        bound = ratio * err_comp + floor_ulps * eps * want.abs().max().item()
        if not err_ours <= bound:  # also catches NaN
            failures.append(
                f"{name}: ours {err_ours:.3e} > {bound:.3e} (composition {err_comp:.3e})"
            )
    assert not failures, f"{case.id}: " + "; ".join(failures)
