"""Registration, dispatch, gradcheck, FLOP counting and torch.compile of the fused adapter op."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import Counter

import pytest
import torch
from kernel_cases import SCALE, Case, make_inputs
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from edgetune.kernels import (
    KERNEL_ENV,
    active_path,
    adapter_backward_flops,
    adapter_flops,
    fused_adapter,
    op,
    reference_adapter,
)
from edgetune.kernels.torch_path import torch_backward, torch_forward_saving

PARAMS = ("x", "D", "b_D", "C", "q", "alpha", "U", "b_U")


def _tensors(case: Case, dtype: torch.dtype = torch.float64, grad: bool = True) -> list:
    inp = make_inputs(case)
    ts = [inp[k].to(dtype).requires_grad_(grad) for k in PARAMS]
    res = None if inp["residual"] is None else inp["residual"].to(dtype).requires_grad_(grad)
    return [*ts, res]


# ------------------------------------------------------------------------------ dispatch


def test_cpu_defaults_to_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert active_path("cpu") == "torch"
    assert active_path(torch.device("cpu")) == "torch"


@pytest.mark.parametrize("path", ["torch", "reference", "triton", " Torch "])
def test_env_forces_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KERNEL_ENV, path)
    assert active_path("cpu") == path.strip().lower()
    ts = _tensors(Case(7, 16, 4, 2, True, True, torch.float32), torch.float32, grad=False)
    out = fused_adapter(*ts[:8], SCALE, ts[8])
    want = reference_adapter(*(t.double() for t in ts[:8]), SCALE, ts[8].double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_unknown_path_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KERNEL_ENV, "cuda-magic")
    with pytest.raises(ValueError, match="expected one of"):
        active_path("cpu")


def test_forced_triton_that_cannot_run_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a process without TRITON_INTERPRET, forcing triton on CPU tensors must raise."""
    code = (
        "import torch\nfrom edgetune.kernels import fused_adapter\n"
        "x = torch.randn(3, 8)\n"
        "try:\n"
        "    fused_adapter(x, torch.randn(8, 4), torch.zeros(4), torch.zeros(1, 4, 4),"
        " torch.zeros(1, 4), torch.ones(1), torch.zeros(4, 8), torch.zeros(8), 1.0)\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', 'TRITON_INTERPRET' in str(e))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env[KERNEL_ENV] = "triton"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "RAISED True" in proc.stdout


def test_automatic_choice_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(op, "_logged", set())
    ts = _tensors(Case(3, 16, 4, 1, False, False, torch.float32), torch.float32, grad=False)
    with caplog.at_level(logging.INFO, logger="edgetune.kernels"):
        for _ in range(3):
            fused_adapter(*ts[:8], SCALE)
    msgs = [r.getMessage() for r in caplog.records if "fused_adapter" in r.getMessage()]
    assert msgs == ["edgetune.kernels.fused_adapter: torch path on cpu tensors"]


# ------------------------------------------------------------------------------ wrapper


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_leading_batch_dims_and_per_token_alpha(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KERNEL_ENV, path)
    B, S, d, r, n = 2, 5, 24, 8, 3
    x = torch.randn(B, S, d)
    D, b_D = torch.randn(d, r) / 5, torch.randn(r)
    C, q = torch.randn(n, r, r) / 4, torch.randn(n, r)
    alpha = torch.softmax(torch.randn(B, S, n), -1)
    U, b_U, res = torch.randn(r, d) / 3, torch.randn(d), torch.randn(B, S, d)
    out = fused_adapter(x, D, b_D, C, q, alpha, U, b_U, SCALE, res)
    assert out.shape == (B, S, d)
    flat = reference_adapter(
        x.reshape(-1, d), D, b_D, C, q, alpha.reshape(-1, n), U, b_U, SCALE, res.reshape(-1, d)
    )
    torch.testing.assert_close(out, flat.view(B, S, d), rtol=1e-5, atol=1e-5)


def test_parameters_cast_to_activation_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KERNEL_ENV, "torch")
    ts = _tensors(Case(4, 16, 4, 2, False, True, torch.float16), torch.float32)
    x16, res16 = ts[0].detach().half().requires_grad_(), ts[8].detach().half()
    out = fused_adapter(x16, *ts[1:8], SCALE, res16)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert ts[1].grad is not None and ts[1].grad.dtype == torch.float32  # through the cast


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_fp32_parameters_get_fp32_gradients(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 activations beside fp32 master weights: gradients are fp32, never rounded to bf16."""
    monkeypatch.setenv(KERNEL_ENV, path)
    inp = make_inputs(Case(40, 24, 8, 3, False, True, torch.bfloat16))
    x = inp["x"].bfloat16().requires_grad_()
    params = [inp[k].float().requires_grad_() for k in PARAMS[1:]]
    out = fused_adapter(x, *params, SCALE, inp["residual"].bfloat16())
    assert out.dtype == torch.bfloat16
    out.backward(inp["grad"].bfloat16())
    assert x.grad.dtype == torch.bfloat16
    for name, p in zip(PARAMS[1:], params):
        assert p.grad.dtype == torch.float32, name
        # a gradient rounded through bf16 is bf16-representable; an fp32 sum of T=40 products
        # is not (chance 2**-16 per element, and every tensor here has >= 3 elements)
        assert not torch.equal(p.grad, p.grad.bfloat16().float()), f"d{name} rounded to bf16"


def test_residual_dtype_mismatch_raises() -> None:
    ts = _tensors(Case(4, 16, 4, 2, False, True, torch.float32), torch.float32, grad=False)
    with pytest.raises(TypeError, match="residual dtype"):
        fused_adapter(*ts[:8], SCALE, ts[8].double())


# ------------------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("per_token", [False, True], ids=["layer", "token"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
def test_gradcheck_cpu_path_fp64(
    per_token: bool, residual: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KERNEL_ENV, "torch")
    ts = _tensors(Case(5, 7, 3, 3, per_token, residual, torch.float64))
    args = [t for t in ts if t is not None]

    def fn(*a: torch.Tensor) -> torch.Tensor:
        return fused_adapter(*a[:8], SCALE, a[8] if residual else None)

    assert torch.autograd.gradcheck(fn, tuple(args))


def test_x_without_grad_skips_dx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KERNEL_ENV, "torch")
    ts = _tensors(Case(6, 16, 8, 2, True, False, torch.float64))
    ts[0].requires_grad_(False)
    fused_adapter(*ts[:8], SCALE).sum().backward()
    ref = _tensors(Case(6, 16, 8, 2, True, False, torch.float64))
    reference_adapter(*ref[:8], SCALE).sum().backward()
    for mine, want in zip(ts[1:8], ref[1:8]):
        torch.testing.assert_close(mine.grad, want.grad)


# ------------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("x_grad", [True, False])
def test_flop_counter_counts_forward_and_backward(
    x_grad: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KERNEL_ENV, "torch")
    T, d_in, r, n, d_out = 11, 40, 8, 3, 17
    ts = _tensors(Case(T, d_in, r, n, True, True, torch.float32, d_out=d_out), torch.float32)
    ts[0].requires_grad_(x_grad)
    with FlopCounterMode(display=False) as counter:
        out = fused_adapter(*ts[:8], SCALE, ts[8])
        fwd = counter.get_total_flops()
        out.sum().backward()
        bwd = counter.get_total_flops() - fwd
    assert fwd == adapter_flops(T, d_in, r, n, d_out) == 2 * T * (d_in * r + n * r * r + r * d_out)
    assert bwd == adapter_backward_flops(T, d_in, r, n, d_out, need_dx=x_grad)
    # backward = 2x forward (input + weight grads) + the recompute of x@D and z@C_b
    recompute = 2 * T * (d_in * r + n * r * r)
    no_dx = 0 if x_grad else 2 * T * d_in * r
    assert bwd == 2 * fwd + recompute - no_dx


# ------------------------------------------------------------------------------ compile / export


def test_torch_compile_traces_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KERNEL_ENV, "torch")
    ts = _tensors(Case(7, 16, 4, 2, False, True, torch.float32), torch.float32)
    compiled = torch.compile(
        lambda *a: fused_adapter(*a[:8], SCALE, a[8]), backend="aot_eager", fullgraph=True
    )
    out = compiled(*ts)
    out.sum().backward()
    grads = [t.grad.clone() for t in ts]
    for t in ts:
        t.grad = None
    eager = fused_adapter(*ts[:8], SCALE, ts[8])
    eager.sum().backward()
    torch.testing.assert_close(out, eager)
    for g, t in zip(grads, ts):
        torch.testing.assert_close(g, t.grad)


def test_torch_export_sees_one_node() -> None:
    class Adapter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.D, self.b_D = (
                torch.nn.Parameter(torch.randn(16, 4)),
                torch.nn.Parameter(torch.zeros(4)),
            )
            self.C, self.q = (
                torch.nn.Parameter(torch.randn(2, 4, 4)),
                torch.nn.Parameter(torch.zeros(2, 4)),
            )
            self.a, self.U = (
                torch.nn.Parameter(torch.zeros(2)),
                torch.nn.Parameter(torch.randn(4, 16)),
            )
            self.b_U = torch.nn.Parameter(torch.zeros(16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            alpha = torch.softmax(self.a, -1)
            return fused_adapter(
                x, self.D, self.b_D, self.C, self.q, alpha, self.U, self.b_U, 0.5, x
            )

    ep = torch.export.export(Adapter(), (torch.randn(2, 3, 16),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.edgetune.fused_adapter.default in targets


@pytest.mark.parametrize("per_token", [False, True], ids=["layer", "token"])
@pytest.mark.parametrize("path", ["torch", "triton", "reference"])
def test_custom_op_and_eager_fast_path_agree(
    path: str, per_token: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registered op (what tracers see) and the eager autograd.Function run the same code."""
    monkeypatch.setenv(KERNEL_ENV, path)
    case = Case(9, 16, 8, 3, per_token, True, torch.float32, d_out=12)
    results = []
    for call in ("eager", "op"):
        ts = _tensors(case, torch.float32)
        if call == "eager":
            assert op.eager_fast_path_ok()
            out = fused_adapter(*ts[:8], SCALE, ts[8])
        else:
            out = torch.ops.edgetune.fused_adapter(*ts[:8], SCALE, ts[8])
        out.backward(torch.ones_like(out))
        results.append([out.detach()] + [t.grad for t in ts])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fast_path_steps_aside_under_dispatch_modes() -> None:
    assert op.eager_fast_path_ok()
    with FlopCounterMode(display=False):
        assert not op.eager_fast_path_ok()


# ------------------------------------------------------------------------------ CPU path passes


class _TokenSizedOps(TorchDispatchMode):
    """Counts the non-view ATen ops that read or write a tensor with a dimension of size T."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.T, self.ops = T, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = tree_flatten((args, kwargs, out))[0]
        if not func.is_view and any(
            isinstance(t, torch.Tensor) and self.T in t.shape for t in flat
        ):
            self.ops[func.overloadpacket.__name__] += 1
        return out


@pytest.mark.parametrize("need_dx", [True, False])
def test_cpu_path_layer_alpha_passes_over_token_data(need_dx: bool) -> None:
    """Per-layer alpha, fp32: the forward touches [T, *] data in 2 GEMMs (bias folded into the
    second) plus the GELU, the ones column and the residual add; the backward in 4 GEMMs (3
    without dx) plus gelu_backward and db_D's sum: no du, no fp64 copy of a [T, *] tensor."""
    T, K, N, r, n = 97, 40, 24, 8, 3  # T is no other size here
    ts = _tensors(Case(T, K, r, n, False, True, torch.float32, d_out=N), torch.float32, False)
    with _TokenSizedOps(T) as fwd:
        out, saved = torch_forward_saving(*ts[:8], SCALE, ts[8])
    gemms = {"mm", "addmm"}
    assert sum(fwd.ops[k] for k in gemms) == 2, fwd.ops
    assert set(fwd.ops) == gemms | {"new_empty", "gelu", "copy_", "fill_", "add_"}, fwd.ops
    g = torch.randn_like(out)
    with _TokenSizedOps(T) as bwd:
        torch_backward(g, *ts[:8], SCALE, need_dx=need_dx, saved=saved)
    assert bwd.ops == Counter({"mm": 3 + need_dx, "gelu_backward": 1, "sum": 1}), bwd.ops
