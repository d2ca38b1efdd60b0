"""LoRA adapters in PEFT's own format, so `peft.PeftModel.from_pretrained` loads them.

A folder with ``adapter_config.json`` (``peft_type = "LORA"``, ``r``, ``lora_alpha``,
``target_modules``) and ``adapter_model.safetensors`` whose keys are PEFT's
``base_model.model.<module>.lora_A.weight`` ([r, d_in]) and ``.lora_B.weight`` ([d_out, r]).
Our LoRA computes ``x A^T B^T * alpha / r`` exactly as PEFT's does, so the same factors give the
same outputs. The task head is not part of PEFT's backbone: it is saved beside them as
``edgetune_head.safetensors`` with the class names in its metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from edgetune.adapters.lora import LoraHandle
from edgetune.errors import ConfigError
from edgetune.protocol import GROUP_HEAD, META_CLASSES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
HEAD_FILE = "edgetune_head.safetensors"


def peft_key(module: str, factor: str) -> str:
    """PEFT's state-dict key of factor ``A`` or ``B`` of ``module``."""
    return f"base_model.model.{module}.lora_{factor}.weight"


def peft_expressible(handle: LoraHandle) -> bool:
    """False once FLoRA has folded updates into dense deltas, which PEFT's LoRA cannot hold."""
    return all(module.merged is None for module in handle.lora_modules.values())


def save_peft_adapter(handle: LoraHandle, folder: str | Path) -> Path:
    """Write ``handle``'s LoRA (and head) as a PEFT adapter folder; returns the folder."""
    if not peft_expressible(handle):
        raise ConfigError(
            "this LoRA holds folded dense updates (FLoRA); PEFT's LoRA format cannot carry them"
        )
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = handle.config
    peft_config = {
        "peft_type": "LORA",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(set(config.targets)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "task_type": None,
        "base_model_name_or_path": handle.spec.name,
    }
    (out / CONFIG_FILE).write_text(json.dumps(peft_config, indent=1))
    weights = {}
    for path, module in handle.lora_modules.items():
        weights[peft_key(path, "A")] = module.A.detach().contiguous()
        weights[peft_key(path, "B")] = module.B.detach().contiguous()
    save_file(weights, str(out / WEIGHTS_FILE))
    head = handle.state_dict_for(GROUP_HEAD)
    if head:
        meta = {META_CLASSES: json.dumps(list(handle.classes))} if handle.classes else None
        save_file({n: t.contiguous() for n, t in head.items()}, str(out / HEAD_FILE), meta)
    return out
