"""LoRA adapters in PEFT's own format, so `peft.PeftModel.from_pretrained` loads them.

The format and its writer live in `edgetune.protocol.peft` (the server writes it too, from
stored tensors); this module feeds it a client's LoRA handle: the factors as the handle holds
them, the head, the class names, ``lora.alpha`` and the backbone's name. Our LoRA computes
``x A^T B^T * alpha / r`` exactly as PEFT's does, so the same factors give the same outputs.
"""

from __future__ import annotations

from pathlib import Path

from edgetune.adapters.lora import LoraHandle
from edgetune.errors import ConfigError
from edgetune.protocol import GROUP_HEAD, GROUP_LORA
from edgetune.protocol.peft import CONFIG_FILE, HEAD_FILE, WEIGHTS_FILE, peft_key, write_peft_folder

__all__ = [
    "CONFIG_FILE",
    "HEAD_FILE",
    "WEIGHTS_FILE",
    "peft_expressible",
    "peft_key",
    "save_peft_adapter",
]


def peft_expressible(handle: LoraHandle) -> bool:
    """False once FLoRA has folded updates into dense deltas, which PEFT's LoRA cannot hold."""
    return all(module.merged is None for module in handle.lora_modules.values())


def save_peft_adapter(handle: LoraHandle, folder: str | Path) -> Path:
    """Write ``handle``'s LoRA (and head) as a PEFT adapter folder; returns the folder."""
    if not peft_expressible(handle):
        raise ConfigError(
            "this LoRA holds folded dense updates (FLoRA); PEFT's LoRA format cannot carry them"
        )
    tensors = {**handle.state_dict_for(GROUP_LORA), **handle.state_dict_for(GROUP_HEAD)}
    config = handle.config
    return write_peft_folder(
        Path(folder),
        tensors,
        alpha=config.alpha,
        dropout=config.dropout,
        base=handle.spec.name,
        classes=handle.classes,
    )
