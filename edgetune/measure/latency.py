"""Latency of a setup: median and p90 of forward and of a training step over warm runs.

Wall time on CPU (``perf_counter``), CUDA events on CUDA.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from edgetune.measure.setup import Setup, device_of, step_closure


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":

        def cuda_time(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return cpu_time


def _stats(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"median_ms": 1e3 * statistics.median(ordered), "p90_ms": 1e3 * p90, "runs": len(times)}


def measure_latency(
    setup: Setup, features: dict[str, Tensor], labels: Tensor, warmup: int, runs: int
) -> dict[str, dict[str, float]]:
    """``{"forward": stats, "train_step": stats}`` after ``warmup`` untimed runs of each."""
    timer = _timer(device_of(setup))
    step = step_closure(setup, features, labels)

    def forward() -> None:
        setup.task.eval()
        with torch.no_grad():
            setup.task(**features)

    out = {}
    for name, fn in (("forward", forward), ("train_step", step)):
        for _ in range(warmup):
            fn()
        out[name] = _stats([timer(fn) for _ in range(runs)])
    return out
