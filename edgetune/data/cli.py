"""`edgetune data`: list the data sets, or show one's class counts and a partition."""

from __future__ import annotations

import argparse
from typing import Any


def register_cli(sub: Any) -> None:
    data = sub.add_parser("data", help="list datasets, or show one dataset's class counts")
    data.add_argument("name", nargs="?", help="fortunes | mnist5k | digits | file.csv/.jsonl")
    data.add_argument("--categories", help="fortunes categories, comma-separated")
    data.add_argument("--clients", type=int, default=0, help="also show a Dirichlet partition")
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
