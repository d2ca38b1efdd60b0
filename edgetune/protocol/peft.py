"""LoRA factors as a PEFT adapter folder, from named tensors alone (no torch modules).

PEFT's LoRA folder is ``adapter_config.json`` (``peft_type = "LORA"``, ``r``, ``lora_alpha``,
``target_modules``) and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module>.lora_A.weight`` ([r, d_in]) and ``.lora_B.weight`` ([d_out, r]);
PEFT computes ``x A^T B^T * lora_alpha / r``, as our LoRA does. The task head is not part of
PEFT's backbone: it is saved beside them as ``edgetune_head.safetensors``, with the class
names in its metadata.

Two writers share `write_peft_folder`: `edgetune.adapters.peft_format.save_peft_adapter`
(simulate, from a client's LoRA handle) and the server's final model (`server/final.py`,
which holds only the stored tensors and the spec). The server's tensors are in wire form, where
B travels as ``B * alpha / rank`` (`edgetune.strategies.lora`); `unscale_wire_lora` turns them
back into the values a handle (and PEFT) holds. Each file is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetune.protocol.final import atomic_write
from edgetune.protocol.names import META_CLASSES, lora_factor

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
HEAD_FILE = "edgetune_head.safetensors"
PEFT_DIR = "peft"  # the sub-folder of final/<family>/ that holds it


def peft_key(module: str, factor: str) -> str:
    """PEFT's state-dict key of factor ``A`` or ``B`` of ``module``."""
    return f"base_model.model.{module}.lora_{factor}.weight"


def lora_rank(tensors: Mapping[str, torch.Tensor]) -> int:
    """The rank of the ``lora.<module>.A`` factors in ``tensors`` (one rank for all)."""
    ranks = {int(t.shape[0]) for n, t in tensors.items() if (lora_factor(n) or ("", ""))[1] == "A"}
    if len(ranks) != 1:
        raise ValueError(f"LoRA factors must have one rank, found {sorted(ranks) or 'none'}")
    return ranks.pop()


def unscale_wire_lora(tensors: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Wire LoRA tensors (B carrying ``alpha / rank``) -> the values a handle of that rank holds."""
    scaling = alpha / lora_rank(tensors)
    return {
        n: t / scaling if (lora_factor(n) or ("", ""))[1] == "B" else t for n, t in tensors.items()
    }


def peft_config(
    rank: int, alpha: float, dropout: float, targets: Sequence[str], base: str | None
) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for a LoRA of these settings."""
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(set(targets)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "task_type": None,
        "base_model_name_or_path": base,
    }


def write_peft_folder(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    alpha: float,
    dropout: float = 0.0,
    base: str | None = None,
    classes: Sequence[str] = (),
) -> Path:
    """Write ``tensors`` (``lora.<module>.A|B`` as a handle holds them, plus optionally the
    head under its wire names) as a PEFT adapter folder; returns the folder.

    ``target_modules`` are the last name components of the factors' modules: our LoRA wraps
    exactly the linear layers whose last component is a target, as PEFT matches them.
    """
    from safetensors.torch import save

    rank = lora_rank(tensors)
    weights, head, modules = {}, {}, set()
    for name, tensor in tensors.items():
        parts = lora_factor(name)
        if parts is None:
            head[name] = tensor.detach().contiguous()
            continue
        weights[peft_key(*parts)] = tensor.detach().contiguous()
        modules.add(parts[0].rpartition(".")[2])
    folder.mkdir(parents=True, exist_ok=True)
    config = peft_config(rank, alpha, dropout, sorted(modules), base)
    atomic_write(folder / CONFIG_FILE, json.dumps(config, indent=1).encode())
    atomic_write(folder / WEIGHTS_FILE, save(weights))
    if head:
        meta = {META_CLASSES: json.dumps(list(classes))} if classes else None
        atomic_write(folder / HEAD_FILE, save(head, metadata=meta))
    return folder
