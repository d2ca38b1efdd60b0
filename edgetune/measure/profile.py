"""`profile_backbone`: FLOPs, parameters, bytes on the wire, latency and peak memory of a setup.

    edgetune profile --backbone minilm-l6 --adapter fedadapter --batch 8 --seq 64 [--json]

* FLOPs (`flops`): ``torch.utils.flop_counter.FlopCounterMode`` over one forward (no grad) and
  one training step (forward + backward; the optimizer step is elementwise and counts zero), the
  fused adapter op included through its registered formula. Counted on the fp32 weights: the
  FLOPs of a step do not depend on the weight format, and bitsandbytes' matmuls have no FLOP
  formula (they would count zero).
* Parameters (`setup`): trainable (adapter + head; ``full``: every backbone weight + head) and
  total.
* Bytes per round (`wire`, ``fedadapter`` / ``lora``): ``len()`` of the safetensors bodies that
  ``edgetune.protocol.encode_payload`` produces with the metadata a client sends (upload) and
  the server serves (download), after the chosen compression. The wire spec is the one
  ``edgetune.adapters.wire_spec`` derives for a client; a setting it refuses (FedAdapter on
  blocks or branches the wire cannot express) reports ``on_wire: false`` and the reason.
  ``full`` reports the bytes of the same kind of payload holding every trainable tensor.
* Latency (`latency`): median and p90 of forward and of a training step (AdamW) over warm runs;
  CUDA events on CUDA.
* Memory (`memory`): the exact bytes of a step's resident parts, and the peak of one step:
  ``max_memory_allocated`` on CUDA; on CPU the growth of the process's resident high-water mark
  (``VmHWM``, reset before the step) over the RSS before it.

The command line (``edgetune profile``) lives in `edgetune.measure.cli`, which loads none of
this (no torch) until a profile runs.
"""

from __future__ import annotations

from typing import Any

from edgetune.config import AdapterConfig, LoraConfig
from edgetune.errors import ConfigError
from edgetune.measure.flops import count_flops
from edgetune.measure.latency import measure_latency
from edgetune.measure.memory import memory_estimate, peak_step_memory
from edgetune.measure.names import ADAPTERS
from edgetune.measure.setup import load_setup, parameter_counts, random_batch
from edgetune.measure.wire import wire_bytes
from edgetune.protocol.names import (
    BRANCHES,
    COMPRESSION_NONE,
    COMPRESSIONS,
    KIND_FEDADAPTER,
    KIND_LORA,
    QUANT_NONE,
)


def _check_options(adapter: str, compression: str, counts: dict[str, int]) -> None:
    if adapter not in ADAPTERS:
        raise ConfigError(f"adapter={adapter!r}: allowed values are {ADAPTERS}")
    if compression not in COMPRESSIONS:
        raise ConfigError(f"compression={compression!r}: allowed values are {COMPRESSIONS}")
    bad = [f"{k}={v}" for k, v in counts.items() if v < (0 if k == "warmup" else 1)]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: batch, seq, runs, family_every must be >= 1, "
                          "warmup >= 0")  # fmt: skip


def _adapter_settings(adapter: str, acfg: AdapterConfig, lcfg: LoraConfig) -> dict[str, Any]:
    """rank, blocks and branches of the profiled adapter (None where they do not apply)."""
    if adapter == KIND_FEDADAPTER:
        blocks = list(acfg.blocks) if isinstance(acfg.blocks, tuple) else acfg.blocks
        return {"rank": acfg.rank, "blocks": blocks, "branches": list(acfg.branches)}
    rank = lcfg.rank if adapter == KIND_LORA else None
    return {"rank": rank, "blocks": None, "branches": None}


def profile_backbone(
    backbone: str,
    quant: str = QUANT_NONE,
    adapter: str = KIND_FEDADAPTER,
    batch: int = 8,
    seq: int = 64,
    *,
    rank: int = 16,
    blocks: str | tuple[int, ...] = "all",
    branches: tuple[str, ...] = BRANCHES,
    lora_rank: int = 8,
    lora_targets: tuple[str, ...] = (),  # (): the architecture's default (q/v projections)
    n_classes: int = 6,
    compression: str = COMPRESSION_NONE,
    family_every: int = 1,
    warmup: int = 2,
    runs: int = 5,
    device: str = "cpu",
    timing: bool = True,
) -> dict[str, Any]:
    """Everything `edgetune profile` reports for one setup, as a JSON-ready dict."""
    counts = {"batch": batch, "seq": seq, "runs": runs, "warmup": warmup}
    _check_options(adapter, compression, counts | {"family_every": family_every})
    acfg = AdapterConfig(rank=rank, blocks=blocks, branches=tuple(branches))
    lcfg = LoraConfig(rank=lora_rank, targets=tuple(lora_targets))
    fp32 = load_setup(backbone, QUANT_NONE, adapter, n_classes, acfg, lcfg, device)
    features, labels = random_batch(fp32.backbone, batch, seq, n_classes, device)
    result: dict[str, Any] = {
        "backbone": backbone,
        "family": fp32.backbone.spec.family,
        "quant": quant,
        "adapter": adapter,
        "batch": batch,
        "seq": seq,
        **_adapter_settings(adapter, acfg, lcfg),
        "n_classes": n_classes,
        "device": device,
        "on_wire": fp32.spec is not None,
        "off_wire": fp32.off_wire,
        "flops": count_flops(fp32, features, labels),
        "params": parameter_counts(fp32),
        "bytes": wire_bytes(fp32, compression, family_every),
    }
    measured = fp32
    if quant != QUANT_NONE:
        measured = load_setup(backbone, quant, adapter, n_classes, acfg, lcfg, device)
    result["quant_in_use"] = measured.backbone.quant
    result["memory_estimate"] = memory_estimate(measured, features, labels)
    if timing:
        result["latency"] = measure_latency(measured, features, labels, warmup, runs)
        result["memory"] = peak_step_memory(measured, features, labels)
    return result
