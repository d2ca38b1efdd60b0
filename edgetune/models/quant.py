"""Quantized frozen backbones: bitsandbytes int8 / nf4 / fp4 linears, a start-up probe, memory.

`apply_quant(backbone, mode)` (what `load_backbone(..., quant=)` calls) swaps the *instances* of the backbone's `nn.Linear` layers
(and GPT-2's `Conv1D`) for `bnb.nn.Linear8bitLt` / `bnb.nn.Linear4bit`; embeddings, norms,
convolutions and heads (`lm_head`, `pooler`, `classifier`, ...) stay full precision. The spec's
fingerprint is computed by the loader before this runs, so every tier of a backbone is one family.

bitsandbytes can import and still fail at its first kernel (Jetson), so `resolve_quant` runs
`probe_quant`: a tiny quantized matmul, forward and backward to the input, on the target device,
checked against fp32. A failing mode falls back nf4 -> int8 -> none (fp4 -> int8 -> none) with
one warning, or raises `ZooError` under `strict=True`. Probe results are cached per process.

Memory accounting (`weight_bytes`, `step_memory`, ...) lives in `edgetune.measure.memory`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from edgetune.errors import ZooError
from edgetune.protocol.names import QUANT_MODES

if TYPE_CHECKING:
    from edgetune.models.zoo import Backbone

log = logging.getLogger(__name__)

FALLBACK_ORDER: dict[str, tuple[str, ...]] = {
    "nf4": ("nf4", "int8", "none"),
    "fp4": ("fp4", "int8", "none"),
    "int8": ("int8", "none"),
    "none": ("none",),
}
# Submodules kept full precision although they hold linears: task heads and the BERT pooler.
HEAD_MODULES = frozenset({"lm_head", "pooler", "classifier", "score", "head", "qa_outputs"})
_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The probe must reproduce an fp32 matmul and its input gradient at least this well.
PROBE_MIN_COSINE = 0.9
_PROBE_CACHE: dict[tuple[str, str, torch.dtype], ProbeResult] = {}


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one probe: `ok`, or the reason it failed (exception type and message)."""

    mode: str
    device: str
    ok: bool
    reason: str = ""
    out_cosine: float = math.nan
    grad_cosine: float = math.nan
    seconds: float = 0.0


def check_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise ZooError(f"quant={mode!r} is not a quantization mode; use one of {QUANT_MODES}")
    return mode


def compute_dtype_of(value: torch.dtype | str | None) -> torch.dtype:
    """`None` -> float32; accepts a torch dtype or its name (float32, bfloat16, float16)."""
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype) and value in _COMPUTE_DTYPES.values():
        return value
    if isinstance(value, str) and value in _COMPUTE_DTYPES:
        return _COMPUTE_DTYPES[value]
    raise ZooError(f"compute_dtype={value!r} is not supported; use one of {list(_COMPUTE_DTYPES)}")


@contextlib.contextmanager
def _quiet_bnb_import() -> Iterator[None]:
    """Mute bitsandbytes' import-time advice to `pip install kernels` (a hub fetcher we must not
    install, DESIGN.md section 8); it only means the optional fused CPU gemv is not used."""
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        yield
    finally:
        noisy.setLevel(level)


class _DropInt8CastNote(logging.Filter):
    """bitsandbytes logs "inputs will be cast from float32 to float16" on *every* int8 matmul
    with fp32 inputs: the expected behaviour of LLM.int8 (row-wise quantization from fp16),
    so it is dropped; every other bitsandbytes record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


def _mute_int8_cast_note() -> None:
    noisy = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNote) for f in noisy.filters):
        noisy.addFilter(_DropInt8CastNote())


def bnb_module():
    """Import bitsandbytes, or raise ZooError saying what to install."""
    with _quiet_bnb_import():
        try:
            import bitsandbytes
        except ImportError as err:
            raise ZooError(
                f"quantized backbones need bitsandbytes: pip install bitsandbytes ({err})"
            ) from err
    return bitsandbytes


# -- swapping linears ---------------------------------------------------------------------------


def _weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[out, in] weight and bias of an nn.Linear or a transformers Conv1D ([in, out] weight)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach(), module.bias
    return module.weight.detach().t().contiguous(), module.bias


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def quantizable_linears(model: nn.Module) -> list[str]:
    """Paths of the linears `quantize_model` swaps: every nn.Linear / Conv1D outside heads."""
    found = []
    for path, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            continue
        if HEAD_MODULES.intersection(path.split(".")):
            continue
        found.append(path)
    return found


def _bias_param(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


def quantize_linear(
    module: nn.Module, mode: str, device: str = "cpu", compute_dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A new frozen bitsandbytes layer holding `module`'s weights quantized on `device`."""
    bnb = bnb_module()
    weight, bias = _weight_and_bias(module)
    out_features, in_features = weight.shape
    if mode == "int8":
        _mute_int8_cast_note()
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=bias is not None, has_fp16_weights=False, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    elif mode in ("nf4", "fp4"):
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=bias is not None,
            compute_dtype=compute_dtype,
            quant_type=mode,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=mode, module=layer)
        # On AVX512-BF16 CPUs a no-grad eval forward repacks the weight in place for a fused
        # bf16 gemv; a later forward with grad then fails (bitsandbytes 0.50.2). Keep the
        # training layout: per instance, no class patching.
        layer.support_avx512bf16_for_cpu = False
    else:
        raise ZooError(f"quantize_linear: mode={mode!r} must be one of int8, nf4, fp4")
    layer.bias = _bias_param(bias)
    return layer.to(device)  # bitsandbytes quantizes on .to(device)


def quantize_model(
    model: nn.Module, mode: str, device: str = "cpu", compute_dtype: torch.dtype = torch.float32
) -> list[str]:
    """Swap every quantizable linear of `model` in place; freeze it; return the swapped paths."""
    paths = quantizable_linears(model)
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(
            parent, leaf, quantize_linear(parent.get_submodule(leaf), mode, device, compute_dtype)
        )
    model.to(device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    _own_full_precision_storage(model)
    return paths


def _own_full_precision_storage(model: nn.Module) -> None:
    """Give the tensors left in full precision their own memory, then return freed heap pages.

    Loaders map the checkpoint file (safetensors mmap) and the parameters view it: while any
    view lives, the whole file stays mapped and its pages resident, including the fp32 linears
    just quantized (86 MB for MiniLM-L6). Copying the embeddings, norms and biases lets the
    mapping go. Tied parameters are one object, so they stay tied.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        # not bitsandbytes' Params4bit / Int8Params; off-CPU tensors were copied by .to()
        if type(tensor) in (nn.Parameter, torch.Tensor) and tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()
    gc.collect()
    _malloc_trim()


def _malloc_trim() -> None:
    """glibc keeps freed heap pages (the quantization transients) resident until trimmed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to trim
        return
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# -- probe and fallback -------------------------------------------------------------------------


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten().cpu(), b.detach().double().flatten().cpu()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _run_probe(mode: str, device: str, compute_dtype: torch.dtype) -> tuple[float, float]:
    """Quantized [8,128] x [128,64] forward + input gradient vs fp32; returns both cosines."""
    target = torch.device(device)  # RuntimeError for a device string torch does not know
    gen = torch.Generator().manual_seed(0)
    reference = nn.Linear(128, 64)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(64, 128, generator=gen) / math.sqrt(128))
        reference.bias.copy_(torch.randn(64, generator=gen))
    layer = quantize_linear(reference, mode, str(target), compute_dtype)
    x = torch.randn(8, 128, generator=gen)
    upstream = torch.randn(8, 64, generator=gen)
    x_q = x.clone().to(target).requires_grad_()
    (layer(x_q) * upstream.to(target)).sum().backward()
    x_ref = x.clone().requires_grad_()
    y_ref = reference(x_ref)
    (y_ref * upstream).sum().backward()
    with torch.no_grad():
        y_q = layer(x.to(target))
    if x_q.grad is None:
        raise RuntimeError("no gradient reached the input of the quantized layer")
    return _cosine(y_q, y_ref), _cosine(x_q.grad, x_ref.grad)


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:300]


def probe_quant(
    mode: str, device: str = "cpu", compute_dtype: torch.dtype | str | None = None
) -> ProbeResult:
    """Run a tiny quantized matmul forward and backward on `device`; cached per process."""
    dtype = compute_dtype_of(compute_dtype)
    key = (check_mode(mode), str(device), dtype)
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    if mode == "none":
        result = ProbeResult(mode, str(device), ok=True, reason="full precision: no kernel")
    else:
        start = time.perf_counter()
        try:
            out_cos, grad_cos = _run_probe(mode, str(device), dtype)
        # Deliberately broad: a native library can fail at its first kernel in any way
        # (RuntimeError, NotImplementedError, OSError, AssertionError, ...); each is a failure
        # with a reason, never swallowed: the caller logs it or raises it.
        except Exception as err:
            result = ProbeResult(mode, str(device), ok=False, reason=_one_line(err))
        else:
            ok = out_cos >= PROBE_MIN_COSINE and grad_cos >= PROBE_MIN_COSINE  # NaN fails
            reason = "" if ok else f"wrong numbers: cosine out {out_cos:.3f}, grad {grad_cos:.3f}"
            result = ProbeResult(
                mode, str(device), ok, reason, out_cos, grad_cos, time.perf_counter() - start
            )
    _PROBE_CACHE[key] = result
    return result


def clear_probe_cache() -> None:
    _PROBE_CACHE.clear()


def resolve_quant(
    mode: str,
    device: str = "cpu",
    strict: bool = False,
    compute_dtype: torch.dtype | str | None = None,
) -> tuple[str, list[ProbeResult]]:
    """The mode to use on `device` (first passing probe in FALLBACK_ORDER) and the probes run.

    A fallback logs one warning naming the requested mode, the reasons and the mode used;
    `strict=True` raises ZooError with the reason instead of falling back.
    """
    probes: list[ProbeResult] = []
    for candidate in FALLBACK_ORDER[check_mode(mode)]:
        result = probe_quant(candidate, device, compute_dtype)
        probes.append(result)
        if result.ok:
            break
        if strict:
            raise ZooError(
                f"quant={mode!r} does not work on device {device!r} (strict=True, no fallback): "
                f"{result.reason}"
            )
    used = probes[-1].mode
    if used != mode:
        reasons = "; ".join(f"{p.mode}: {p.reason}" for p in probes if not p.ok)
        log.warning(
            "quant=%r unavailable on device %r (%s); falling back to quant=%r",
            mode,
            device,
            reasons,
            used,
        )
    return used, probes


def apply_quant(
    backbone: Backbone,
    mode: str,
    device: str = "cpu",
    compute_dtype: torch.dtype | str | None = None,
    strict: bool = False,
) -> Backbone:
    """Quantize a loaded `Backbone` in place (after its spec fingerprinted the fp32 weights).

    Sets `backbone.quant` to the mode in use and `backbone.extras["quant"]` to the details.
    """
    dtype = compute_dtype_of(compute_dtype)
    used, probes = resolve_quant(mode, device, strict, dtype)
    paths: list[str] = []
    if used != "none":
        paths = quantize_model(backbone.model, used, device, dtype)
        if not paths:
            raise ZooError(
                f"{backbone.spec.name}: quant={mode!r} asked, but it has no linear layers "
                f"outside its head to quantize; use quant='none'"
            )
    elif str(device) != "cpu":
        backbone.model.to(device)
    backbone.quant = used
    backbone.extras["quant"] = {
        "requested": mode,
        "used": used,
        "device": str(device),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "layers": paths,
        "probes": probes,
    }
    return backbone
