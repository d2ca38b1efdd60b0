"""`edgetune profile`: FLOPs, parameters, bytes on the wire, latency and peak memory of one setup.

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

This module loads no torch until a profile runs, so ``edgetune --help`` stays torch-free.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from edgetune.config import AdapterConfig, LoraConfig
from edgetune.errors import ConfigError
from edgetune.measure.names import ADAPTERS
from edgetune.protocol.names import (
    BRANCHES,
    COMPRESSION_NONE,
    COMPRESSIONS,
    KIND_FEDADAPTER,
    KIND_LORA,
    QUANT_MODES,
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
    lora_targets: tuple[str, ...] = ("query", "value"),
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
    from edgetune.measure.flops import count_flops
    from edgetune.measure.latency import measure_latency
    from edgetune.measure.memory import memory_estimate, peak_step_memory
    from edgetune.measure.setup import load_setup, parameter_counts, random_batch
    from edgetune.measure.wire import wire_bytes

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


def _wire_rows(wire: dict[str, Any]) -> list[tuple[str, str]]:
    if "upload" not in wire:
        return [("bytes on the wire", f"none: {wire['note']}")]
    rows = [(f"upload bytes ({key})", f"{value:,}") for key, value in wire["upload"].items()]
    rows += [(f"download bytes ({key})", f"{value:,}") for key, value in wire["download"].items()]
    rows.append(("upload bytes / round", f"{wire['upload_per_round']:,.0f}"))
    if wire.get("note"):
        rows.append(("bytes note", wire["note"]))
    return rows


def format_table(result: dict[str, Any]) -> str:
    """A human-readable table of one profile."""
    gf, params = result["flops"], result["params"]
    rows = [
        ("backbone", f"{result['backbone']} ({result['quant']}), adapter={result['adapter']}"),
        ("batch x seq", f"{result['batch']} x {result['seq']}"),
        ("forward GFLOPs", f"{gf['forward'] / 1e9:.4f}"),
        ("train step GFLOPs", f"{gf['train_step'] / 1e9:.4f}"),
        ("trainable / total params", f"{params['trainable']:,} / {params['total']:,}"),
        *_wire_rows(result["bytes"]),
    ]
    for name, stats in result.get("latency", {}).items():
        rows.append(
            (f"{name} ms (median / p90)", f"{stats['median_ms']:.2f} / {stats['p90_ms']:.2f}")
        )
    est = result["memory_estimate"]
    rows.append(("train memory MB (weights+saved+grads+adamw)", f"{est['train_bytes'] / 1e6:.1f}"))
    if "memory" in result:
        mem = result["memory"]
        rows.append((f"peak step memory MB ({mem['source']})", f"{mem['peak_bytes'] / 1e6:.1f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _blocks_arg(text: str) -> str | tuple[int, ...]:
    """``all``, ``from:N`` or a comma-separated list of block indices (e.g. ``0,2``)."""
    if text == "all" or text.startswith("from:"):
        return text
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use all, from:N or indices like 0,2") from None


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help="FLOPs, params, bytes, latency, memory of a setup")
    p.add_argument("--backbone", required=True, help="zoo name or model folder")
    p.add_argument("--quant", default=QUANT_NONE, choices=QUANT_MODES)
    p.add_argument("--adapter", default=KIND_FEDADAPTER, choices=ADAPTERS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=16, help="FedAdapter rank")
    p.add_argument("--blocks", type=_blocks_arg, default="all",
                   help="FedAdapter blocks: all, from:N, or indices like 0,2 (not on the wire)")  # fmt: skip
    p.add_argument("--branches", default=",".join(BRANCHES),
                   help="FedAdapter branches, comma-separated (the wire carries all three)")  # fmt: skip
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--n-classes", type=int, default=6)
    p.add_argument("--compression", default=COMPRESSION_NONE, choices=COMPRESSIONS)
    p.add_argument("--family-every", type=int, default=1, help="family bundle every P rounds")
    p.add_argument("--runs", type=int, default=5, help="timed runs after warm-up")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    result = profile_backbone(
        args.backbone, args.quant, args.adapter, args.batch, args.seq, rank=args.rank,
        blocks=args.blocks, branches=tuple(args.branches.split(",")), lora_rank=args.lora_rank,
        n_classes=args.n_classes, compression=args.compression, family_every=args.family_every,
        warmup=args.warmup, runs=args.runs, device=args.device,
    )  # fmt: skip
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0
