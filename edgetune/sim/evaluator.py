"""The simulation's evaluator: test accuracy of the server's global model of each family.

One `FamilyEvaluator` per family holds the family's full-precision backbone with the run's
adapter. It registers with the server like any client (tier `evaluator`), never uploads, and
evaluates each new model version the server publishes on the shared test split. The global
model is the aggregated global branch + family bundle + head with the private branch at zero
(what a new client of the family would start from).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgetune.client.runtime import ClientRuntime, ClientSettings, ShardSpec
from edgetune.client.trainer import EncodedSplit, evaluate
from edgetune.config import LoraConfig, RunConfig, TrainConfig
from edgetune.models.zoo import load_backbone
from edgetune.protocol import initial_tensors

log = logging.getLogger(__name__)


class FamilyEvaluator:
    def __init__(
        self, config: RunConfig, backbone: str, url: str | None, token: str | None
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="edgetune-eval-")
        data = config.data
        shard = ShardSpec(
            dataset=data.dataset,
            categories=tuple(data.categories),
            max_per_class=data.max_per_class,
            num_clients=1,
            alpha=data.alpha,
            seed=config.seed,
            test_fraction=data.test_fraction,
            local_holdout=0.0,
        )
        settings = ClientSettings(
            server=url or "http://127.0.0.1:9",
            join_token=token or "",
            backbone=backbone,
            state_dir=Path(self._tmp.name),
            shard=shard,
            tier="evaluator",
            kind=config.strategy,
            adapter=config.adapter,
            lora=LoraConfig(**dataclasses.asdict(config.lora)),
            train=TrainConfig(max_length=config.train.max_length),
            eval_test_at_end=False,
        )
        self.runtime = ClientRuntime(settings)
        test = self.runtime.dataset.test
        if data.eval_samples and data.eval_samples < len(test):
            keep = np.sort(
                np.random.default_rng(config.seed).permutation(len(test))[: data.eval_samples]
            )
            test = test.subset(keep)
        self.test = EncodedSplit(self.runtime.backbone, test, config.train.max_length)
        self.family = self.runtime.spec.family
        self.next_version = 0
        if url is not None:
            self.runtime.register()

    @classmethod
    def for_config(
        cls, config: RunConfig, url: str | None, token: str | None
    ) -> dict[str, FamilyEvaluator]:
        """One evaluator per distinct family (tiers of one backbone share it)."""
        evaluators: dict[str, FamilyEvaluator] = {}
        seen_backbones: set[str] = set()
        for group in config.groups:
            if group.backbone in seen_backbones:
                continue
            seen_backbones.add(group.backbone)
            family = load_backbone(group.backbone).spec.family
            if family not in evaluators:
                evaluators[family] = cls(config, group.backbone, url, token)
        return evaluators

    def current_round(self) -> dict[str, Any]:
        return self.runtime.server.current_round()

    def evaluate_new(self) -> list[dict[str, Any]]:
        """Evaluate every family version published since the last call, in order.

        Versions are fetched with `?version=N`, so a round that closed while another family
        was being evaluated is not skipped.
        """
        info = self.current_round()
        # A family without participants in a round keeps its bundle, but the global branch it
        # shares with the other families still moves: every round is a new model to evaluate.
        latest = max(int(info.get("family_version") or 0), int(info.get("global_version") or 0))
        results = []
        for version in range(self.next_version, latest + 1):
            self._clear_private()
            self.runtime.download_models(info, version=version)
            result = evaluate(self.runtime.task, self.test)
            log.info(
                "family %s version %d: test accuracy %.4f", self.family, version, result.accuracy
            )
            results.append({"version": version, "acc": result.accuracy, "loss": result.loss})
        self.next_version = max(self.next_version, latest + 1)
        return results

    def evaluate_initial(self) -> dict[str, Any]:
        """The round-0 model without a server (local-only runs): the server's initial tensors."""
        glob, fam = initial_tensors(self.runtime.spec, seed=self.runtime.settings.shard.seed)
        if glob:
            self.runtime.handle.load_group("global", glob)
        self.runtime.load_family(fam)
        result = evaluate(self.runtime.task, self.test)
        return {"version": 0, "acc": result.accuracy, "loss": result.loss}

    def _clear_private(self) -> None:
        private = self.runtime.handle.state_dict_for("private")
        if private:
            self.runtime.handle.load_group("private", {n: t.zero_() for n, t in private.items()})
