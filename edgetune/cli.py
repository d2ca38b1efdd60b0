"""The `edgetune` command: one subcommand per job, each registered by the room that owns it.

Every room's `cli` module only builds its argparse parser and imports its heavy parts (torch,
transformers, onnxruntime) inside the command, so `edgetune --help` loads no torch. The two
catalogue commands that look across rooms (`zoo`: backbones with their adapters and weight
memory; `data`: data sets and partitions) live here, above the rooms.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from edgetune import __version__
from edgetune.errors import EdgeTuneError
from edgetune.protocol.names import QUANT_MODES

#: The modules whose ``register_cli(subparsers)`` add the subcommands, in help order.
COMMAND_MODULES = (
    "edgetune.sim.cli",  # simulate, demo
    "edgetune.server.cli",  # server
    "edgetune.client.cli",  # client
    "edgetune.measure.cli",  # profile
    "edgetune.onnx.cli",  # export, infer
)


class HelpFormatter(argparse.HelpFormatter):
    """Every subcommand's help: an option's default follows its help text, unless the text
    already says it or there is none to show (a flag, a required option, an absent default,
    whose help then says what absence means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if text == argparse.SUPPRESS or "default" in text or not shows_default(action):
            return action.help
        return f"{text} (default: %(default)s)"


def shows_default(action: argparse.Action) -> bool:
    """True for an option whose default the formatter can print (a value, not absence)."""
    if not action.option_strings or action.required or action.nargs == 0:
        return False
    return action.default not in (None, [], (), argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetune",
        description="EdgeTune: federated fine-tuning on heterogeneous edge devices "
        "(FedAdapter over frozen, quantized backbones). `edgetune demo` runs the main job.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"edgetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    _register_zoo(sub)
    _register_data(sub)
    for command in sub.choices.values():  # -v before or after the subcommand alike
        command.formatter_class = HelpFormatter
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="debug logging")  # fmt: skip
    return parser


def _register_zoo(sub: Any) -> None:
    zoo = sub.add_parser("zoo", help="list backbones, or show one backbone's spec")
    zoo.add_argument("name", nargs="?", help="zoo name or local model folder")
    zoo.add_argument("--json", action="store_true", help="print the spec as JSON")
    zoo.add_argument("--kind", dest="adapter", choices=("fedadapter", "lora"),
                     help="print the parameter counts of this adapter kind (default: none)")  # fmt: skip
    zoo.add_argument("--adapter", dest="adapter", choices=("fedadapter", "lora"),
                     default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old name of --kind  # fmt: skip
    zoo.add_argument("--rank", type=int, default=16, help="adapter rank (with --kind)")
    zoo.add_argument("--anchors", type=int, default=2, help="global anchor slots K")
    zoo.add_argument(
        "--quant",
        choices=QUANT_MODES,
        help="print the weight memory per dtype at this quantization next to fp32 (default: none)",
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


def _register_data(sub: Any) -> None:
    data = sub.add_parser("data", help="list datasets, or show one dataset's class counts")
    data.add_argument("name", nargs="?", help="fortunes | mnist5k | digits | file.csv/.jsonl")
    data.add_argument(
        "--categories",
        help="fortunes categories, comma-separated (default: the six of data.categories)",
    )
    data.add_argument(
        "--clients",
        type=_positive,
        help="also show a Dirichlet partition over this many clients (default: none)",
    )
    data.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    data.add_argument("--seed", type=int, default=0, help="seeds the split and the partition")
    data.set_defaults(func=_cmd_data)


def _cmd_data(args: argparse.Namespace) -> int:
    from edgetune.data.datasets import DATASETS, fortune_categories, load_dataset
    from edgetune.data.partition import dirichlet_partition, label_skew, partition_summary

    if args.name is None:
        for name, description in DATASETS.items():
            print(f"{name:<10} {description}")
        print(f"\nfortunes categories: {', '.join(fortune_categories())}")
        print("Any .csv/.jsonl file with `text` and `label` columns works as a path too.")
        return 0
    options = {"seed": args.seed}
    if args.categories:
        options["categories"] = [c.strip() for c in args.categories.split(",") if c.strip()]
    dataset = load_dataset(args.name, **options)
    print(f"{dataset.name}: {dataset.modality}, {len(dataset.classes)} classes\n")
    print(dataset.class_counts())
    if args.clients:
        parts = dirichlet_partition(dataset.train.labels, args.clients, args.alpha, seed=args.seed)
        print(
            f"\nDirichlet(alpha={args.alpha}) over {args.clients} clients, "
            f"label skew {label_skew(dataset.train.labels, parts):.3f}:\n"
        )
        print(partition_summary(dataset.train.labels, parts, dataset.classes))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        return int(args.func(args) or 0)
    except EdgeTuneError as err:
        print(f"edgetune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
