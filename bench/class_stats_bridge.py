"""Heads from class statistics, bridged across families, on frozen features (issue 13).

    python bench/class_stats_bridge.py                 # 3 settings x 3 seeds (~10 min, 2 cores)
    python bench/class_stats_bridge.py --settings demo-a0.1 --seeds 0

The head `edgetune.strategies.class_stats` gives each family in a run's first statistics round
(`train.head = "stats"`: every device reports the statistics of its local training texts under
the frozen backbones of the families it runs; the devices and shards of the demo config: four
MiniLM-L6 devices that also run MiniLM-L3, two that run only MiniLM-L3), with the alternatives
it is measured against. Rows per family, scored on the run's evaluation subset:

- ``probe``: the reference row (logistic regression on every training text, normalised features);
- ``lda_own``: LDA head from the statistics of the devices that run the family;
- ``lda_bridged``: the same plus every other device's statistics mapped through the ridge bridge
  fit on the devices that run both families;
- ``lda_all``: LDA head had every device run the family (the bridge's ceiling).

No training: this isolates what the statistics carry. Frozen fp32 backbones for every device
(the run's quantization tiers are not applied). Writes bench/results/class_stats_bridge.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchinfo import machine_info, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetune.client.stats import frozen_features  # noqa: E402
from edgetune.config import RunConfig, load_config  # noqa: E402
from edgetune.data.datasets import Split  # noqa: E402
from edgetune.data.shards import load_run_dataset, load_shard  # noqa: E402
from edgetune.sim.evaluator import eval_subset  # noqa: E402
from edgetune.strategies.class_stats import (  # noqa: E402
    ClassStats,
    ClientStats,
    lda_head,
    totals_for,
)

DEMO = ROOT / "edgetune" / "configs" / "demo.toml"
SECOND = '["art", "work", "literature", "linux", "songs-poems", "men-women"]'
SETTINGS: dict[str, list[str]] = {
    "demo": [],
    "second-a0.3": [f"data.categories={SECOND}", "data.alpha=0.3"],
    "demo-a0.1": ["data.alpha=0.1"],
}
ROWS = ["probe", "lda_own", "lda_bridged", "lda_all"]


def pooled(backbone_name: str, split: Split, config: RunConfig, n_classes: int) -> torch.Tensor:
    """The pooled features the task's head sees under the frozen fp32 backbone (float64)."""
    return frozen_features(backbone_name, split, n_classes, config.train.max_length)[1]


def client_reports(config: RunConfig, n_classes: int) -> list[ClientStats]:
    """Every client's statistics as a run would send them in round 1 (frozen = current): a
    device's first client also its frozen part and its bridges to the device's other families."""
    reports = []
    for device, group in enumerate(g for g in config.groups for _ in range(g.count)):
        _, train, _ = load_shard(config.data, config.seed, device, config.num_devices)
        labels = torch.as_tensor(np.asarray(train.labels))
        feats = {b: pooled(b, train, config, n_classes) for b in group.backbones}
        first = feats[group.backbone]
        stats = {b: ClassStats.of(x, labels, n_classes) for b, x in feats.items()}
        bridges = {b: (feats[b].T @ feats[b], feats[b].T @ first) for b in group.also}
        reports.append(
            ClientStats(group.backbone, stats[group.backbone], stats[group.backbone], bridges)
        )
        reports += [ClientStats(b, stats[b], None, {}) for b in group.also]
    return reports


def lda_accuracy(stats: ClassStats | None, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    if stats is None:
        return float("nan")
    weight, bias = lda_head(stats)
    return float(((test_x @ weight.T + bias).argmax(1) == test_y).double().mean())


def probe_accuracy(
    train_x: torch.Tensor, train_y: list[int], test_x: torch.Tensor, test_y: list[int]
) -> float:
    from sklearn.linear_model import LogisticRegression

    norm = torch.nn.functional.normalize
    classifier = LogisticRegression(C=1.0, max_iter=5000).fit(norm(train_x, dim=-1), train_y)
    return float((classifier.predict(norm(test_x, dim=-1)) == np.asarray(test_y)).mean())


def run_cell(sets: list[str], seed: int) -> dict[str, dict[str, float]]:
    config = load_config(DEMO, [*sets, f"seed={seed}"])
    dataset = load_run_dataset(config.data, config.seed)
    n_classes = len(dataset.classes)
    test = eval_subset(config, dataset.test)
    test_y = torch.as_tensor(np.asarray(test.labels))
    reports = client_reports(config, n_classes)
    cell: dict[str, dict[str, float]] = {}
    for family in sorted({b for g in config.groups for b in g.backbones}):
        test_x = pooled(family, test, config, n_classes)
        train_x = pooled(family, dataset.train, config, n_classes)
        own = [r for r in reports if r.family == family]
        every = ClassStats.of(train_x, torch.as_tensor(np.asarray(dataset.train.labels)), n_classes)
        cell[family] = {
            "probe": probe_accuracy(train_x, dataset.train.labels, test_x, test.labels),
            "lda_own": lda_accuracy(totals_for(family, own), test_x, test_y),
            "lda_bridged": lda_accuracy(totals_for(family, reports), test_x, test_y),
            "lda_all": lda_accuracy(every, test_x, test_y),
        }
        print(seed, family, {k: round(100 * v, 1) for k, v in cell[family].items()}, flush=True)
    return cell


def markdown(table: dict[str, Any]) -> list[str]:
    lines = []
    for setting, families in table.items():
        lines += [f"\n**{setting}** (mean over seeds; min-max in brackets)\n"]
        lines += ["| family | " + " | ".join(ROWS) + " |", "|---" * (len(ROWS) + 1) + "|"]
        for family, rows in families.items():
            cells = [
                f"{100 * statistics.mean(v):.1f} ({100 * min(v):.1f}-{100 * max(v):.1f})"
                for v in (rows[r] for r in ROWS)
            ]
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(2)
    table: dict[str, Any] = {}
    for setting in args.settings:
        for seed in args.seeds:
            for family, rows in run_cell(SETTINGS[setting], seed).items():
                slot = table.setdefault(setting, {}).setdefault(family, {r: [] for r in ROWS})
                for r in ROWS:
                    slot[r].append(rows[r])
    result = {
        "machine": machine_info(
            ["edgetune/strategies/class_stats.py", "bench/class_stats_bridge.py"]
        ),
        "seeds": args.seeds,
        "table": table,
    }
    write_results("class_stats_bridge", result, markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
