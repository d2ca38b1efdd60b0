"""`edgetune zoo`: list the offline backbones, or show one backbone's spec and counts."""

from __future__ import annotations

import argparse
import json
from typing import Any

from edgetune.protocol.names import QUANT_MODES


def register_cli(sub: Any) -> None:
    zoo = sub.add_parser("zoo", help="list backbones, or show one backbone's spec")
    zoo.add_argument("name", nargs="?", help="zoo name or local model folder")
    zoo.add_argument("--json", action="store_true", help="print the spec as JSON")
    zoo.add_argument("--adapter", choices=("fedadapter", "lora"), help="print parameter counts")
    zoo.add_argument("--rank", type=int, default=16, help="adapter rank (with --adapter)")
    zoo.add_argument("--anchors", type=int, default=2, help="global anchor slots K")
    zoo.add_argument(
        "--quant",
        choices=QUANT_MODES,
        help="print the weight memory per dtype at this quantization next to fp32",
    )
    zoo.set_defaults(func=_cmd_zoo)


def _cmd_zoo(args: argparse.Namespace) -> int:
    from edgetune.models.zoo import ZOO, load_backbone

    if args.name is None:
        width = max(len(n) for n in ZOO)
        for name, (description, _) in ZOO.items():
            print(f"{name:<{width}}  {description}")
        print("\nAny local Hugging Face folder (BERT, ViT, GPT-2, Llama) works as a path too.")
        return 0
    if args.quant is not None:
        from edgetune.models.weights import memory_table

        print(memory_table(args.name, quants=tuple(dict.fromkeys(("none", args.quant)))))
        return 0
    backbone = load_backbone(args.name)
    if args.adapter:
        return _print_adapter_counts(backbone, args)
    spec = backbone.spec.to_dict()
    if args.json:
        print(json.dumps(spec, indent=2))
        return 0
    for key, value in spec.items():
        shown = (
            f"{value[0]} ... {value[-1]} ({len(value)})"
            if isinstance(value, list) and value
            else value
        )
        print(f"{key:<12} {shown}")
    return 0


def _print_adapter_counts(backbone, args: argparse.Namespace) -> int:
    from edgetune.adapters.fedadapter import apply_fedadapter
    from edgetune.adapters.lora import apply_lora
    from edgetune.config import AdapterConfig, LoraConfig

    if args.adapter == "lora":
        handle = apply_lora(backbone.model, backbone.spec, LoraConfig(rank=args.rank))
    else:
        config = AdapterConfig(rank=args.rank, n_anchors=args.anchors)
        handle = apply_fedadapter(backbone.model, backbone.spec, config)
    counts = handle.parameter_counts()
    print(f"{backbone.spec.name} + {args.adapter} (rank {args.rank}): parameters per group")
    for group, count in counts.items():
        if count:
            share = (
                f"{100 * count / counts['backbone']:.3f}% of backbone"
                if group != "backbone"
                else ""
            )
            print(f"  {group:<14} {count:>12,}  {share}")
    return 0
