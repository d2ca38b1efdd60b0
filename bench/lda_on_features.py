"""How good are a family's features, frozen and fine-tuned? (issue 13)

    python bench/lda_on_features.py runs/demo minilm-l6             # the demo's run folder
    python bench/lda_on_features.py RUN FAMILY --set data.alpha=0.1  # the run's --set values

Fits the shrunk LDA head of `edgetune.strategies.class_stats` on the pooled features of *every*
training text (no bridge, no federation) and scores it on the run's evaluation subset, once on
the frozen backbone and once with the run's final adapter (``RUN/final/FAMILY``); also prints
the final model's own head. The difference between the two LDA rows is what fine-tuning did to
the features; the difference between the last two, what the federated head loses.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("family")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    args = parser.parse_args()
    import transformers.activations  # noqa: F401  (before ROOT, whose kernels/ it must not see)

    sys.path.insert(0, str(ROOT))
    from edgetune.client.runtime import ClientRuntime
    from edgetune.client.stats import pooled_features
    from edgetune.client.trainer import EncodedSplit
    from edgetune.config import ClientConfig, load_config
    from edgetune.sim.evaluator import eval_subset
    from edgetune.strategies.class_stats import ClassStats, lda_head

    config = load_config(ROOT / "edgetune" / "configs" / "demo.toml", args.sets)
    client = ClientConfig(state_dir=str(args.run / "lda-check"), backbone=args.family)
    config = dataclasses.replace(
        config,
        client=client,
        train=dataclasses.replace(config.train, head="sgd"),
        data=dataclasses.replace(config.data, local_holdout=0.0),
    )
    runtime = ClientRuntime(config, "")
    test = EncodedSplit(
        runtime.backbone, eval_subset(config, runtime.dataset.test), config.train.max_length
    )

    def lda_accuracy() -> float:
        train_x = pooled_features(runtime.task, runtime.train_data)
        stats = ClassStats.of(train_x, runtime.train_data.labels, runtime.n_classes)
        weight, bias = lda_head(stats)
        logits = pooled_features(runtime.task, test) @ weight.T + bias
        return 100 * float((logits.argmax(1) == test.labels).double().mean())

    print(f"LDA on every training text, frozen features:     {lda_accuracy():.1f}")
    runtime.handle.load(args.run / "final" / args.family / "adapter.safetensors")
    print(f"LDA on every training text, fine-tuned features: {lda_accuracy():.1f}")
    with torch.no_grad():
        own = runtime.task(**test.batch(torch.arange(len(test)))[0]).argmax(1)
    print(f"the run's final model with its own head:         "
          f"{100 * float((own == test.labels).double().mean()):.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
