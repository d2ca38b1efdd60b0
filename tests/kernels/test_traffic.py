"""The traffic model (edgetune.kernels.traffic) against bytes derived by hand for one shape."""

from __future__ import annotations

import torch

from edgetune.kernels import triton_path
from edgetune.kernels.traffic import step_traffic


def test_training_step_bytes_match_a_hand_count() -> None:
    """fp16, T=64, d=32, r=16, n=2, everything re-read from L2 (l2_bytes huge).

    Forward: rank kernel reads x and the fp16 parameter copies, writes h (fp32) and u (fp16);
    up kernel reads u, U, b_U and the residual, writes out. Backward: rank kernel reads h, g
    and parameters, writes u, z, du, dh (fp32) and dh (fp16); branch kernel reads z, du per
    branch and dh once; the two strips read u + g and dh + x + D, write dx; the host reduction
    reads every fp32 slot and writes fp32 weight gradients.
    """
    T, d, r, n, h2, f4 = 64, 32, 16, 2, 2, 4
    got = step_traffic(T, d, r, n, torch.float16, max_programs=4, l2_bytes=1 << 40)
    params16 = (d * r + r + n * r * r + n * r + n + r * d + d) * h2
    grads32 = params16 // h2 * f4
    fwd = T * d * h2 + params16 + T * r * (f4 + h2) + T * r * h2 + T * d * h2 * 2
    assert got["fwd_bytes"] == fwd
    p_t, _, p_s, _ = triton_path.token_splits(T, d, r, d, n, 4, torch.float16)
    partial = (p_t * (r * d + d + r * d) + p_s * (n * (r * r + r + 1) + r)) * f4
    rank = T * r * f4 + (n * r * r + n * r + n + r * d) * h2 + T * d * h2
    rank += T * r * (h2 + 3 * f4 + h2)
    branch = n * 2 * T * r * f4 + T * r * f4 + (n * r * r + n * r + n) * h2
    branch += p_s * (n * (r * r + r + 1) + r) * f4
    strips = T * r * h2 + T * d * h2 + T * r * h2 + T * d * h2 + d * r * h2 + T * d * h2
    strips += p_t * (r * d + d + r * d) * f4
    assert got["partial_bytes"] == partial and got["weight_grad_bytes"] == grads32
    assert got["bwd_bytes"] == rank + branch + strips + partial + grads32
    assert got["bwd_min"] == 3 * T * d * h2 and got["fwd_min"] == 3 * T * d * h2
