"""Weight memory of a backbone, exactly: bytes per dtype of parameters, buffers and the packed
4-bit / 8-bit storage bitsandbytes keeps, and the table `edgetune zoo --quant` prints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import nn

from edgetune.models.quant import quantizable_linears

__all__ = ["backbone_tensor_hashes", "linear_weight_bytes", "memory_table", "weight_bytes"]


def _quant_state_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Tensors bitsandbytes keeps beside the parameters: 4-bit QuantState (absmax, code,
    offset, nested state) and int8 row scales / codes (SCB, CB) on the weight and the state."""
    weight = getattr(module, "weight", None)
    stack = [getattr(weight, "quant_state", None)]
    while stack:
        state = stack.pop()
        if state is None:
            continue
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                yield value
            elif type(value).__name__ == "QuantState":
                stack.append(value)
    for holder in (weight, getattr(module, "state", None)):
        for attr in ("CB", "SCB"):
            value = getattr(holder, attr, None)
            if isinstance(value, torch.Tensor):
                yield value


def _module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()
    for sub in module.modules():
        yield from _quant_state_tensors(sub)


def _bytes_by_dtype(tensors: Iterator[torch.Tensor]) -> dict[str, int]:
    """Bytes per dtype name, each storage counted once (tied or shared tensors)."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen or tensor.device.type == "meta":
            continue
        seen.add(key)
        name = str(tensor.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + storage.nbytes()
    return dict(sorted(out.items()))


def backbone_tensor_hashes(model: nn.Module, exclude: tuple[torch.Tensor, ...] = ()) -> list[str]:
    """Sorted sha256 digests of every backbone tensor (parameters, buffers, quant state), minus
    `exclude` (e.g. adapter parameters); names are left out since adapters rename paths."""
    skip = {id(t) for t in exclude}
    digests = []
    for tensor in _module_tensors(model):
        if id(tensor) in skip:
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        head = f"{tuple(tensor.shape)}|{tensor.dtype}|".encode()
        digests.append(hashlib.sha256(head + flat.numpy().tobytes()).hexdigest())
    return sorted(digests)


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Exact resident bytes of `model` per dtype: parameters, buffers, quant state."""
    return _bytes_by_dtype(_module_tensors(model))


def linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes per dtype of the quantizable linear layers only (quantized or not)."""
    bnb_types = ("Linear4bit", "Linear8bitLt")
    wanted = set(quantizable_linears(model))
    modules = [
        module
        for path, module in model.named_modules()
        if type(module).__name__ in bnb_types or path in wanted
    ]
    return _bytes_by_dtype(t for m in modules for t in _module_tensors(m))


def memory_table(name: str, quants: tuple[str, ...] = ("none", "int8", "nf4")) -> str:
    """Weight memory of backbone `name` per quant mode and dtype, as a printable table."""
    from edgetune.models.zoo import load_backbone

    rows = []
    for mode in quants:
        backbone = load_backbone(name, quant=mode)
        used = backbone.quant if backbone.quant == mode else f"{mode}->{backbone.quant}"
        rows.append((used, weight_bytes(backbone.model), linear_weight_bytes(backbone.model)))
        del backbone
    dtypes = sorted({d for _, per, _ in rows for d in per})
    base_total = sum(rows[0][1].values())
    base_linear = sum(rows[0][2].values())
    mb = 1e6
    head = f"{'quant':<10}" + "".join(f"{d + ' MB':>12}" for d in dtypes)
    lines = [
        f"{name}: weight memory (embeddings, norms and heads stay full precision)",
        head + f"{'total MB':>11}{'ratio':>7}{'linears MB':>12}{'ratio':>7}",
    ]
    for used, per, linear in rows:
        total, lin = sum(per.values()), sum(linear.values())
        cells = "".join(f"{per.get(d, 0) / mb:>12.2f}" for d in dtypes)
        lines.append(
            f"{used:<10}{cells}{total / mb:>11.2f}{total / base_total:>7.3f}"
            f"{lin / mb:>12.2f}{lin / max(base_linear, 1):>7.3f}"
        )
    lines.append(f"ratios are to {quants[0]!r}")
    return "\n".join(lines)


# -- one training step and its peak resident memory ---------------------------------------------
