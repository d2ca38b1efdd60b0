"""Shared case builder and error checks for the fused-adapter tests.

The acceptance rule (DESIGN.md section 5): for the forward and every gradient, the fused op's
max-abs error against the fp64 reference is at most RATIO x the error of the plain PyTorch
composition (reference_adapter run in the same low dtype, same rounded inputs), plus a floor.

"The error of the composition" is the worst over the given summation order and
COMPOSITION_ORDERINGS relabelings of the same problem (see composition_error): one order alone
can be luckily exact on a cancelling sum and would turn the rule into a coin toss.

The floor is FLOOR_ULPS ulps at the tensor's own scale (eps(dtype) * max|ref|):
- a result merely *stored* in dtype carries up to half an ulp of rounding, so where the
  composition is exact (d residual = g passes through; a bias gradient whose sum rounds
  exactly) a correctly rounded fused result would otherwise fail;
- in fp32 the CPU path re-associates on purpose (branches and scale folded into W = s M U,
  MKL-friendly layouts), and per-layer dalpha at T=1 is a single sum of r products that
  cancels ~25x, so sub-ulp differences in z and du surface as several ulps of the result.
  Measured over the full table: worst excess over 2x the composition is 4.2 ulps (that
  case), <= 1.2 ulps for every other tensor, and <= 0.1 ulp for the Triton kernels; fp32 gets
  8 ulps (1e-6 relative). fp16/bf16 errors are dominated by the composition's own rounding of
  every intermediate: 1 ulp. A real bug (wrong term, half-precision accumulation) shows at
  >= 1e-3 relative, i.e. thousands of fp32 ulps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from edgetune.kernels import fused_adapter, reference_adapter

NAMES = ("x", "D", "b_D", "C", "q", "alpha", "U", "b_U", "residual")
SCALE = 0.75
# extra summation orders of the composition (see composition_error). Two were too few: on an
# AMD EPYC (MKL's non-Intel code path) the per-layer dalpha of T=1, r=8 (a sum of 8 products)
# measured 3.0e-8 over 1+2 orders, 6.5e-8 over 1+4, 1.5e-7 over 1+16, and the torch path's own
# error 9.3e-8: a few draws of an 8-term sum do not show its rounding noise. 8 costs ~7 s.
COMPOSITION_ORDERINGS = 8

# per-dtype tolerance table: (max ratio to the composition's error, floor in ulps of max|ref|)
TOLERANCE = {
    torch.float32: (2.0, 8.0),
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


# Which axes of every tensor carry which index (T tokens, K = d_in, R = rank, B = branch,
# N = d_out); permuting an index consistently everywhere leaves the math unchanged.
AXES = {
    "x": "TK",
    "D": "KR",
    "b_D": "R",
    "C": "BRR",
    "q": "BR",
    "U": "RN",
    "b_U": "N",
    "residual": "TN",
    "grad": "TN",
    "out": "TN",
}


def _permute(name: str, t: Tensor, perms: dict[str, Tensor]) -> Tensor:
    base = name[1:] if name.startswith("d") and name[1:] in (*AXES, "alpha") else name
    axes = AXES.get(base, "TB" if t.dim() == 2 else "B")  # alpha: [T, n] or [n]
    for dim, ax in enumerate(axes):
        t = t.index_select(dim, perms[ax])
    return t


def composition_error(
    case: Case, inputs: dict, ref: dict, orderings: int = COMPOSITION_ORDERINGS
) -> dict:
    """Max-abs error of the plain composition over the given order plus `orderings` random
    relabelings of tokens, hidden units, rank units and branches.

    Such a relabeling is the same function but a different summation order for every GEMM and
    reduction; the composition's error is a property of an arbitrary order, so a single order
    can be luckily exact on a cancelling sum (per-layer dalpha is a single sum of T*r products
    whose |result| is ~1/25 of sum|terms|). Taking the worst of a few orders measures the
    composition's rounding noise instead of one draw of it; max-abs error is invariant under
    the relabeling, so the permuted reference is the reference permuted.
    """
    err = {
        k: (run(reference_adapter, inputs, case.dtype)[k].double() - v).abs().max().item()
        for k, v in ref.items()
    }
    g = torch.Generator().manual_seed(1234)
    for _ in range(orderings):
        n_out = inputs["U"].shape[1]
        sizes = {"T": case.T, "K": case.d, "R": case.r, "B": case.n, "N": n_out}
        perms = {ax: torch.randperm(n, generator=g) for ax, n in sizes.items()}
        p_in = {k: None if v is None else _permute(k, v, perms) for k, v in inputs.items()}
        comp = run(reference_adapter, p_in, case.dtype)
        for k, v in ref.items():
            e = (comp[k].double() - _permute(k, v, perms)).abs().max().item()
            err[k] = max(err[k], e)
    return err


@functools.cache
def _oracle(case: Case, seed: int) -> tuple[dict, dict, dict]:
    """(inputs, fp64 reference, composition error), shared by every path tested on a case."""
    inputs = make_inputs(case, seed)
    ref = run(reference_adapter, inputs, torch.float64)
    return inputs, ref, composition_error(case, inputs, ref)


def check_case(case: Case, seed: int = 0) -> None:
    """Assert the acceptance rule for the currently dispatched fused path on one case."""
    inputs, ref, comp_err = _oracle(case, seed)
    ours = run(fused_adapter, inputs, case.dtype)
    ratio, floor_ulps = TOLERANCE[case.dtype]
    eps = torch.finfo(case.dtype).eps
    failures = []
    for name, want in ref.items():
        assert ours[name] is not None, f"{case.id}: no gradient for {name}"
        assert ours[name].dtype == case.dtype and ours[name].shape == want.shape, name
        err_ours = (ours[name].double() - want).abs().max().item()
        bound = ratio * comp_err[name] + floor_ulps * eps * want.abs().max().item()
        if not err_ours <= bound:  # also catches NaN
            failures.append(
                f"{name}: ours {err_ours:.3e} > {bound:.3e} (composition {comp_err[name]:.3e})"
            )
    assert not failures, f"{case.id}: " + "; ".join(failures)
