"""FLOP counting shared by the trainer and `edgetune profile`.

`torch.utils.flop_counter.FlopCounterMode` has formulas for matmuls and the generic SDPA ops,
but not for the CPU flash-attention kernels that BERT's attention dispatches to on CPU; without
them attention would silently count as zero. The fused adapter op registers its own formula.
"""

from __future__ import annotations

import torch


def _cpu_flash_fwd(q_shape, k_shape, v_shape, *args: object, **kwargs: object) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _cpu_flash_bwd(g_shape, q_shape, k_shape, v_shape, *args: object, **kwargs: object) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(g_shape, q_shape, k_shape, v_shape)


def flop_counter():  # -> FlopCounterMode (imported lazily)
    """FlopCounterMode that also counts CPU flash attention (torch has no formula for it)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd,
    }
    return FlopCounterMode(display=False, custom_mapping=custom)
