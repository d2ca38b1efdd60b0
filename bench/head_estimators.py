"""Which head can a server fit from class statistics alone, against the logistic probe? (issue 13)

    python bench/head_estimators.py                        # 4 category sets x 3 seeds (~25 min)
    python bench/head_estimators.py --sets demo --seeds 0

The statistics heads (`edgetune.strategies.class_stats`) see only per-class sums, counts and
the Gram of the pooled features, so the head is a function of class means and the pooled
within-class covariance W. This scores, on frozen fp32 features of every training text (no
federation, no bridge: the ceiling of each estimator), the ``probe`` reference row (logistic
regression, L2-normalised features, C = `PROBE_C`) against what the statistics allow:

- ``lda s=...``: `lda_head` with the covariance shrunk towards the identity by s (the default
  `SHRINKAGE` is 0.9);
- ``lda oas``: the shrinkage the OAS formula (Chen et al. 2010) picks from W and n alone;
- ``ccvr C=...``: logistic regression on 256 virtual features per class drawn from N(mu_c, W)
  (CCVR, Luo et al. 2021), features scaled by the mean class-mean norm so C acts as on
  unit-norm features.

Frozen features are cached under ``--cache`` (one file per set and seed). Writes
bench/results/head_estimators.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers.activations  # noqa: F401  (before ROOT: its kernels/ must not shadow)
from benchinfo import machine_info, write_results
from cross_family import SECOND
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetune.client.stats import frozen_features  # noqa: E402
from edgetune.config import load_config  # noqa: E402
from edgetune.data.shards import load_run_dataset  # noqa: E402
from edgetune.sim.evaluator import eval_subset  # noqa: E402
from edgetune.sim.references import PROBE_C  # noqa: E402
from edgetune.strategies.class_stats import (  # noqa: E402
    SHRINKAGE,
    ClassStats,
    class_moments,
    lda_head,
)

DEMO = ROOT / "edgetune" / "configs" / "demo.toml"
#: category set -> its --set override on the demo config (alpha does not matter: every text).
SETS = {
    "demo": [],
    "second": [f"data.categories={SECOND}"],
    "third": ['data.categories=["drugs", "education", "wisdom", "sports", "love", "humorists"]'],
    "fourth": [
        'data.categories=["zippy", "platitudes", "people", "definitions", "perl",'
        ' "miscellaneous", "knghtbrd", "disclaimer"]'
    ],
}
FAMILIES = ("minilm-l3", "minilm-l6")
SHRINKAGES = (0.3, 0.5, 0.7, SHRINKAGE)
CCVR_C = (0.3, 1.0)
VIRTUAL_PER_CLASS = 256


def cached_features(setting: str, seed: int, cache: Path) -> dict[str, Any]:
    """Frozen train and evaluation features of every family, with labels (cached)."""
    path = cache / f"{setting}_{seed}.pt"
    if path.is_file():
        return torch.load(path)
    config = load_config(DEMO, [*SETS[setting], f"seed={seed}"])
    dataset = load_run_dataset(config.data, seed)
    k, length = len(dataset.classes), config.train.max_length
    test = eval_subset(config, dataset.test)
    out: dict[str, Any] = {"K": k, "ytr": torch.as_tensor(np.asarray(dataset.train.labels))}
    out["yte"] = torch.as_tensor(np.asarray(test.labels))
    for family in FAMILIES:
        out[family] = tuple(frozen_features(family, s, k, length)[1] for s in (dataset.train, test))
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def oas_shrinkage(stats: ClassStats) -> float:
    """The OAS shrinkage intensity of W (sklearn.covariance.OAS's formula)."""
    _, within, _ = class_moments(stats)
    n, d = float(stats.counts.sum()), within.shape[0]
    mu, alpha = float(torch.trace(within)) / d, float((within**2).mean())
    return min((alpha + mu**2) / ((n - len(stats.counts) + 1) * (alpha - mu**2 / d)), 1.0)


def logistic(x: Tensor, y: Tensor, x_test: Tensor, c: float) -> Tensor:
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(C=c, max_iter=5000).fit(x.numpy(), y.numpy())
    return torch.as_tensor(classifier.predict(x_test.numpy()))


def ccvr_predict(stats: ClassStats, x_test: Tensor, c: float) -> Tensor:
    means, within, _ = class_moments(stats)
    k, d = means.shape
    jitter = 1e-6 * float(torch.trace(within)) / d * torch.eye(d, dtype=within.dtype)
    factor = torch.linalg.cholesky(within + jitter)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(k * VIRTUAL_PER_CLASS, d, generator=gen, dtype=within.dtype)
    virtual = means.repeat_interleave(VIRTUAL_PER_CLASS, 0) + noise @ factor.T
    scale = float(means.norm(dim=1).mean())
    labels = torch.arange(k).repeat_interleave(VIRTUAL_PER_CLASS)
    return logistic(virtual / scale, labels, x_test / scale, c)


def score_family(x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor, k: int) -> dict:
    stats = ClassStats.of(x, y, k)
    norm = torch.nn.functional.normalize
    predictions = {"probe": logistic(norm(x, dim=-1), y, norm(x_test, dim=-1), PROBE_C)}
    for s in (*SHRINKAGES, oas_shrinkage(stats)):
        weight, bias = lda_head(stats, s)
        name = f"lda s={s:g}" if s in SHRINKAGES else "lda oas"
        predictions[name] = (x_test @ weight.T + bias).argmax(1)
    for c in CCVR_C:
        predictions[f"ccvr C={c:g}"] = ccvr_predict(stats, x_test, c)
    return {name: float((p == y_test).double().mean()) for name, p in predictions.items()}


def markdown(table: dict[str, dict[str, dict[str, list[float]]]]) -> list[str]:
    rows = list(next(iter(next(iter(table.values())).values())))
    lines = ["| set | family | " + " | ".join(rows) + " |", "|---" * (len(rows) + 2) + "|"]
    every: dict[str, list[float]] = {r: [] for r in rows}
    for setting, families in table.items():
        for family, scores in families.items():
            means = {r: statistics.mean(scores[r]) for r in rows}
            cells = [f"{100 * means[r]:.1f}" for r in rows]
            lines.append(f"| {setting} | {family} | " + " | ".join(cells) + " |")
            for r in rows:
                every[r].append(means[r])
    cells = [f"**{100 * statistics.mean(every[r]):.2f}**" for r in rows]
    return [*lines, "| mean | every cell | " + " | ".join(cells) + " |"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "head_estimators")
    args = parser.parse_args()
    torch.set_num_threads(2)
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for setting in args.sets:
        for seed in args.seeds:
            cell = cached_features(setting, seed, args.cache)
            for family in FAMILIES:
                (x, x_test), k = cell[family], cell["K"]
                scores = score_family(x, cell["ytr"], x_test, cell["yte"], k)
                print(setting, seed, family, {n: round(100 * v, 1) for n, v in scores.items()})
                slot = table.setdefault(setting, {}).setdefault(family, {})
                for name, value in scores.items():
                    slot.setdefault(name, []).append(value)
    files = ["edgetune/strategies/class_stats.py", "bench/head_estimators.py"]
    result = {"machine": machine_info(files), "seeds": args.seeds, "table": table}
    write_results("head_estimators", result, markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
