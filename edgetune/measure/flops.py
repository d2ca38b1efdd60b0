"""FLOP counting shared by the trainer and `edgetune profile`.

`torch.utils.flop_counter.FlopCounterMode` has formulas for matmuls and the generic SDPA ops,
but not for the CPU flash-attention kernels that BERT's attention dispatches to on CPU; without
them attention would silently count as zero. The fused adapter op registers its own formula.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from edgetune.measure.setup import Setup


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


def count_flops(setup: Setup, features: dict[str, Tensor], labels: Tensor) -> dict[str, int]:
    """Exact forward and training-step FLOPs of a setup (the optimizer step counts zero: it is
    elementwise). Count on fp32 weights: bitsandbytes' matmuls have no FLOP formula."""
    task = setup.task
    task.eval()
    with torch.no_grad(), flop_counter() as fwd:
        task(**features)
    task.train()
    with flop_counter() as step:
        nn.functional.cross_entropy(task(**features), labels).backward()
    for param in setup.trainable:
        param.grad = None
    task.eval()
    return {"forward": int(fwd.get_total_flops()), "train_step": int(step.get_total_flops())}
