"""edgetune.adapters: FedAdapter and LoRA on frozen backbones, swapped in as module instances.

`fedadapter` (the multi-branch adapter over the fused op), `lora` (the baselines' adapter),
`handle` (the wire names of an injected adapter, save/load, removal), `build` (one `inject`
and one `wire_spec` for every caller) and `peft_format` (LoRA saved as a PEFT adapter).
"""

from edgetune._lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "fedadapter": ("FedAdapterLayer", "apply_fedadapter"),
        "lora": ("LoraHandle", "LoraLinear", "apply_lora"),
        "handle": ("AdapterHandle",),
        "build": ("inject", "wire_spec"),
        "peft_format": ("save_peft_adapter",),
    },
)
