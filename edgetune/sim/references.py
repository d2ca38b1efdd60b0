"""Reference rows: what every federated result is judged against, per family.

Each row scores a family's model on the same evaluation subset (`eval_subset`) of the same
seeded split that `simulate`'s evaluator uses, so the numbers sit beside a federated run's
``final_global_acc`` as they are:

- ``probe``: a logistic-regression classifier on the family's frozen, pooled, L2-normalised
  features, fit to convergence on the whole training split;
- ``centralized``: the run's adapter and head on the family's fp32 backbone, one client holding
  the whole training split, trained for the same ``rounds x train.epochs`` passes;
- ``homogeneous``: the run itself (FedAdapter, same clients, shards and budget) with every
  client switched to the family's fp32 backbone;
- ``isolated``: FedAdapter among the family's own clients alone (their tiers and shards as in
  the full run), so nothing crosses families.

`run_reference` writes ``summary.json`` (``final_global_acc`` per family, plus details) into
the output folder; the federated sub-runs keep their own folders below it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetune.client.runtime import ClientRuntime
from edgetune.client.trainer import EncodedSplit, evaluate
from edgetune.config import ClientConfig, ClientGroup, RunConfig
from edgetune.data.shards import load_run_dataset
from edgetune.errors import EdgeTuneError
from edgetune.models.heads import build_task_model
from edgetune.models.zoo import load_backbone
from edgetune.sim.evaluator import eval_subset, evaluation_plan, family_of
from edgetune.sim.harness import run_simulation
from edgetune.sim.report import perplexity

log = logging.getLogger(__name__)
FEDERATED_BASE = "fedadapter"  # the strategy homogeneous and isolated runs federate with
PROBE_C = 1.0  # inverse L2 strength of the probe (the sweep of 0.1..10 moved < 2 points)


def run_reference(config: RunConfig, out: Path) -> dict[str, Any]:
    """Compute reference row ``config.strategy`` for every family; write ``summary.json``."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    row = ROWS[config.strategy]
    per_family = {
        family: row(config, family, backbone, out)
        for family, (backbone, _) in evaluation_plan(config).items()
    }
    summary = {
        "strategy": config.strategy,
        "reference": True,
        "rounds": config.rounds,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "final_global_acc": {f: r["acc"] for f, r in per_family.items()},
        "per_family": per_family,
        "clients": [],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def probe(config: RunConfig, family: str, backbone_name: str, out: Path) -> dict[str, Any]:
    """Logistic regression on frozen pooled features of the whole training split."""
    from sklearn.linear_model import LogisticRegression

    backbone = load_backbone(backbone_name)
    dataset = load_run_dataset(config.data, config.seed)
    task = build_task_model(backbone, "classify", n_classes=len(dataset.classes))
    train = _pooled_features(task, EncodedSplit(backbone, dataset.train, config.train.max_length))
    test_split = eval_subset(config, dataset.test)
    test = _pooled_features(task, EncodedSplit(backbone, test_split, config.train.max_length))
    classifier = LogisticRegression(C=PROBE_C, max_iter=5000)
    classifier.fit(train, dataset.train.labels)
    acc = float((classifier.predict(test) == np.asarray(test_split.labels)).mean())
    log.info("probe %s: test accuracy %.4f", family, acc)
    return {"acc": acc, "backbone": backbone_name, "train_samples": len(train), "C": PROBE_C}


@torch.no_grad()
def _pooled_features(task: torch.nn.Module, data: EncodedSplit) -> np.ndarray:
    """What the task's head sees (pooled last hidden state), L2-normalised, for every sample."""
    captured: list[torch.Tensor] = []
    hook = task.head.register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
    try:
        task.eval()
        for index in torch.arange(len(data)).split(64):
            task(**data.batch(index)[0])
    finally:
        hook.remove()
    return torch.nn.functional.normalize(torch.cat(captured).float(), dim=-1).numpy()


def centralized(config: RunConfig, family: str, backbone_name: str, out: Path) -> dict[str, Any]:
    """The run's adapter and head, one client with the whole training split, same passes."""
    with tempfile.TemporaryDirectory(prefix="edgetune-centralized-") as state:
        runtime = centralized_runtime(config, backbone_name, state)
        runtime.run_local()
        test = eval_subset(config, runtime.dataset.test)
        acc = evaluate(runtime.task, EncodedSplit(runtime.backbone, test, config.train.max_length))
    log.info("centralized %s: test accuracy %.4f", family, acc.accuracy)
    # statistics rounds (train.head = "stats") train nothing, here as in the federation
    epochs = len(config.training_rounds()) * config.train.epochs
    row = {"acc": acc.accuracy, "backbone": backbone_name, "epochs": epochs}
    if config.task == "lm":  # acc is next-token accuracy; the lm metric is perplexity
        row.update(loss=acc.loss, perplexity=perplexity(acc.loss))
    return row


def centralized_runtime(config: RunConfig, backbone_name: str, state_dir: str) -> ClientRuntime:
    """The `centralized` row's client: no server, the whole training split, no holdout."""
    client = ClientConfig(backbone=backbone_name, state_dir=state_dir, eval_test_at_end=False)
    data = dataclasses.replace(config.data, local_holdout=0.0)
    return ClientRuntime(dataclasses.replace(config, strategy="local", client=client, data=data))


def homogeneous(config: RunConfig, family: str, backbone_name: str, out: Path) -> dict[str, Any]:
    """The same federation (clients, shards, budget) with every client on this family."""
    groups = tuple(
        dataclasses.replace(g, backbone=backbone_name, quant="none", also=()) for g in config.groups
    )
    run = dataclasses.replace(config, strategy=FEDERATED_BASE, groups=groups)
    return _federated_row(run, family, out / f"homogeneous-{family}")


def isolated(config: RunConfig, family: str, backbone_name: str, out: Path) -> dict[str, Any]:
    """FedAdapter among this family's clients alone, with the shards they hold in the run."""
    groups: list[ClientGroup] = []
    shard_ids: list[int] = []
    index = 0
    for group in config.groups:
        if family_of(group.backbone) == family:
            groups.append(dataclasses.replace(group, also=()))
            shard_ids += list(range(index, index + group.count))
        index += group.count
    server = dataclasses.replace(config.server, min_clients=0)
    run = dataclasses.replace(config, strategy=FEDERATED_BASE, groups=tuple(groups), server=server)
    return _federated_row(run, family, out / f"isolated-{family}", (shard_ids, index))


def _federated_row(
    run: RunConfig, family: str, out: Path, shards: tuple[list[int], int] | None = None
) -> dict[str, Any]:
    summary = run_simulation(run, out, shards)
    acc = summary["final_global_acc"].get(family)
    if acc is None or summary["final_round"] != run.rounds:
        raise EdgeTuneError(f"reference run in {out} did not finish its {run.rounds} rounds")
    row = {"acc": acc, "out": str(out), "clients": run.num_clients, "rounds": run.rounds}
    perplexity = summary.get("final_global_perplexity", {}).get(family)  # task = "lm" only
    return row if perplexity is None else {**row, "perplexity": perplexity}


ROWS: dict[str, Callable[[RunConfig, str, str, Path], dict[str, Any]]] = {
    "probe": probe,
    "centralized": centralized,
    "homogeneous": homogeneous,
    "isolated": isolated,
}
