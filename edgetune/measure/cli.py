"""`edgetune profile`: the command line of `edgetune.measure.profile` (torch-free to register).

    edgetune profile --backbone minilm-l6 --kind fedadapter --batch-size 8 --seq 64 [--json]

Building the parser imports only torch-free modules; the profile itself (torch) loads when the
command runs, so ``edgetune --help`` stays torch-free.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from edgetune.measure.names import ADAPTERS
from edgetune.protocol.names import (
    BRANCHES,
    COMPRESSION_NONE,
    COMPRESSIONS,
    KIND_FEDADAPTER,
    QUANT_MODES,
    QUANT_NONE,
)


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


def register_cli(sub: Any) -> None:
    """Add the ``profile`` subcommand; it runs via ``args.func(args)``."""
    p = sub.add_parser(
        "profile",
        help="FLOPs, params, bytes, latency, memory of a setup",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", required=True, help="zoo name or model folder")
    p.add_argument("--quant", default=QUANT_NONE, choices=QUANT_MODES, help="backbone weights")
    p.add_argument("--kind", dest="adapter", default=KIND_FEDADAPTER, choices=ADAPTERS,
                   help="adapter kind that trains")  # fmt: skip
    p.add_argument("--adapter", dest="adapter", choices=ADAPTERS, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # old name of --kind  # fmt: skip
    p.add_argument("--batch-size", dest="batch", type=int, default=8, help="samples per step")
    p.add_argument("--batch", dest="batch", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # old name of --batch-size  # fmt: skip
    p.add_argument("--seq", type=int, default=64, help="tokens per sample (text models)")
    p.add_argument("--rank", type=int, default=16, help="FedAdapter rank")
    p.add_argument("--blocks", type=_blocks_arg, default="all",
                   help="FedAdapter blocks: all, from:N, or indices like 0,2 (not on the wire)")  # fmt: skip
    p.add_argument("--branches", default=",".join(BRANCHES),
                   help="FedAdapter branches, comma-separated (the wire carries all three)")  # fmt: skip
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (--kind lora)")
    p.add_argument("--n-classes", type=int, default=6, help="classes of the task head")
    p.add_argument("--compression", default=COMPRESSION_NONE, choices=COMPRESSIONS,
                   help="update compression for the byte counts")  # fmt: skip
    p.add_argument("--family-every", type=int, default=1, help="family bundle every P rounds")
    p.add_argument("--runs", type=int, default=5, help="timed runs after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from edgetune.measure.profile import profile_backbone

    result = profile_backbone(
        args.backbone, args.quant, args.adapter, args.batch, args.seq, rank=args.rank,
        blocks=args.blocks, branches=tuple(args.branches.split(",")), lora_rank=args.lora_rank,
        n_classes=args.n_classes, compression=args.compression, family_every=args.family_every,
        warmup=args.warmup, runs=args.runs, device=args.device,
    )  # fmt: skip
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0
