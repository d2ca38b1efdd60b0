"""Round-0 tensors of a family: what the server materialises once and every client starts from."""

from __future__ import annotations

import math
import zlib

import torch

from edgetune.protocol.codec import FLOAT_DTYPES
from edgetune.protocol.names import DTYPE_NAMES, GROUP_FAMILY, GROUP_LORA, HEAD_WEIGHT
from edgetune.protocol.spec import AdapterSpec


def family_seed(seed: int, family: str) -> int:
    """Deterministic per-family seed, so every server run initializes a family identically."""
    return (seed * 1_000_003 + zlib.crc32(family.encode())) % (1 << 63)


def initial_tensors(
    spec: AdapterSpec, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Round-0 (global, family) tensors: C = q = U = 0, D Kaiming-uniform, LoRA B = 0.

    The server materializes these once per family, so all clients of a family start from the
    same weights and the adapted model starts exactly as the backbone.
    """
    gen = torch.Generator().manual_seed(family_seed(seed, spec.family))
    dtype = FLOAT_DTYPES[DTYPE_NAMES[spec.dtype]][0]
    glob = {n: torch.zeros(t.shape, dtype=dtype) for n, t in spec.global_tensors().items()}
    fam: dict[str, torch.Tensor] = {}
    for name, t in spec.family_tensors().items():
        leaf = name.rsplit(".", 1)[1]
        if (name.endswith(".D") and t.group == GROUP_FAMILY) or (
            t.group == GROUP_LORA and leaf == "A"
        ):
            fan_in = t.shape[0] if leaf == "D" else t.shape[1]
            bound = 1.0 / math.sqrt(fan_in)
            fam[name] = (torch.rand(t.shape, generator=gen) * 2 - 1).mul_(bound).to(dtype)
        elif name == HEAD_WEIGHT:
            bound = 1.0 / math.sqrt(t.shape[1])
            fam[name] = (torch.rand(t.shape, generator=gen) * 2 - 1).mul_(bound).to(dtype)
        else:
            fam[name] = torch.zeros(t.shape, dtype=dtype)
    return glob, fam
