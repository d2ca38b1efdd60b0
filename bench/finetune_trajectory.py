"""Does fine-tuning beat the frozen probe, and when? Centralized LP-FT, epoch by epoch (issue 13).

    python bench/finetune_trajectory.py                             # demo + second set, 3 seeds
    python bench/finetune_trajectory.py --settings demo --seeds 0 --families minilm-l6
    python bench/finetune_trajectory.py --epochs 6 --set train.lr=0.001

The `centralized` reference row trains the run's adapter on every training text against the
head fitted from class statistics (frozen: LP-FT) and scores only the end. This script runs the
same recipe one epoch at a time (one client holding the whole training split, the family's
fp32 backbone, the demo config's `[train]` section plus any ``--set``) and after every epoch
scores three heads on the run's evaluation subset:

- ``frozen``: the statistics head fitted before training, kept frozen (what the adapter trains
  against; a federated run's rounds 2 to R-1 report this one);
- ``lda``: the statistics head refit on the fine-tuned features of every training text (what
  the final statistics round gives);
- ``probe``: logistic regression (C = 1, L2-normalised features), the `probe` row's classifier,
  on the fine-tuned features: how good the features are, whatever head reads them.

Epoch 0 is the frozen backbone (its ``probe`` column is the `probe` reference row). Writes
bench/results/finetune_trajectory.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers.activations  # noqa: F401  (before class_stats_bridge puts ROOT on the path)
from benchinfo import machine_info, write_results
from class_stats_bridge import DEMO, SETTINGS

from edgetune.client.stats import pooled_features
from edgetune.client.trainer import EncodedSplit, evaluate, train_local
from edgetune.config import load_config
from edgetune.sim.evaluator import eval_subset
from edgetune.sim.references import centralized_runtime
from edgetune.strategies.class_stats import ClassStats, lda_head

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("frozen", "lda", "probe")
FAMILIES = ("minilm-l3", "minilm-l6")


def trajectory(sets: list[str], seed: int, family: str, epochs: int) -> list[dict[str, float]]:
    """[{head: accuracy}] for epochs 0..``epochs`` of centralized LP-FT on ``family``."""
    config = load_config(DEMO, [*sets, f"seed={seed}"])
    with tempfile.TemporaryDirectory(prefix="edgetune-trajectory-") as state:
        runtime = centralized_runtime(config, family, state)
        run = runtime.config
        runtime.load_initial()
        test_split = eval_subset(run, runtime.dataset.test)
        test = EncodedSplit(runtime.backbone, test_split, run.train.max_length)
        labels, n_classes = runtime.train_data.labels, runtime.n_classes

        def scores() -> dict[str, float]:
            x = pooled_features(runtime.task, runtime.train_data)
            test_x = pooled_features(runtime.task, test)
            weight, bias = lda_head(ClassStats.of(x, labels, n_classes))
            lda = ((test_x @ weight.T + bias).argmax(1) == test.labels).double().mean()
            return {
                "frozen": evaluate(runtime.task, test).accuracy,
                "lda": float(lda),
                "probe": probe_accuracy(x, labels, test_x, test.labels),
            }

        if not runtime.statistics_round(1):
            raise SystemExit("the config must fit its head from statistics (train.head = stats)")
        runtime._train_and_evaluate(1)  # statistics round: fits the head it then keeps frozen
        rows = [scores()]
        one_epoch = dataclasses.replace(run.train, epochs=1)
        for epoch in range(1, epochs + 1):
            groups = runtime._param_groups()
            train_local(
                runtime.task, groups, runtime.train_data, one_epoch, epoch, f"epoch {epoch}"
            )
            rows.append(scores())
            print(seed, family, epoch, {k: round(100 * v, 1) for k, v in rows[-1].items()},
                  flush=True)  # fmt: skip
    return rows


def probe_accuracy(
    x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> float:
    from sklearn.linear_model import LogisticRegression

    norm = torch.nn.functional.normalize
    classifier = LogisticRegression(C=1.0, max_iter=5000).fit(norm(x, dim=-1), y.numpy())
    return float((classifier.predict(norm(test_x, dim=-1)) == test_y.numpy()).mean())


def markdown(table: dict[str, Any], epochs: int) -> list[str]:
    lines = []
    for setting, families in table.items():
        for family, runs in families.items():
            n = len(runs)
            lines += [f"\n**{setting}, {family}** (mean of {n} seeds; test accuracy %)\n"]
            lines += ["| epoch | " + " | ".join(HEADS) + " |", "|---" * (len(HEADS) + 1) + "|"]
            for epoch in range(epochs + 1):
                cells = [f"{100 * statistics.mean(r[epoch][h] for r in runs):.1f}" for h in HEADS]
                lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["demo", "second-a0.3"],
                        choices=list(SETTINGS))  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--epochs", type=int, default=6, help="the demo's 3 training rounds x 2")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    args = parser.parse_args()
    torch.set_num_threads(2)
    table: dict[str, Any] = {}
    for setting in args.settings:
        for family in args.families:
            table.setdefault(setting, {})[family] = [
                trajectory([*SETTINGS[setting], *args.sets], seed, family, args.epochs)
                for seed in args.seeds
            ]
    result = {
        "machine": machine_info(["bench/finetune_trajectory.py", "edgetune/configs/demo.toml"]),
        "seeds": args.seeds,
        "sets": args.sets,
        "epochs": args.epochs,
        "table": table,
    }
    write_results("finetune_trajectory", result, markdown(table, args.epochs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
