"""The simulation's evaluator: test accuracy of the server's global model of each family.

One `FamilyEvaluator` per family holds the family's full-precision backbone with the run's
adapter. It registers with the server like any client (tier `evaluator`), never uploads, and
evaluates each new model version the server publishes on the shared test split. The global
model is the aggregated global branch + family bundle + head with the private branch at zero
(what a new client of the family would start from).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgetune.adapters.lora import LoraHandle
from edgetune.adapters.peft_format import peft_expressible, save_peft_adapter
from edgetune.client.runtime import ClientRuntime
from edgetune.client.trainer import EncodedSplit, evaluate
from edgetune.config import ClientConfig, RunConfig
from edgetune.data.datasets import Split
from edgetune.errors import ConfigError
from edgetune.models.zoo import load_backbone
from edgetune.protocol import GROUP_PRIVATE, META_GROUPS
from edgetune.protocol.final import write_final

log = logging.getLogger(__name__)


class FamilyEvaluator:
    """The evaluator of one family: its fp32 backbone with the adapter at the family's rank."""

    def __init__(
        self, config: RunConfig, backbone: str, rank: int, url: str | None, token: str | None
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="edgetune-eval-")
        client = ClientConfig(
            url=url or "",
            state_dir=self._tmp.name,
            backbone=backbone,
            rank=rank,
            eval_test_at_end=False,
        )
        data = dataclasses.replace(config.data, local_holdout=0.0)
        train = dataclasses.replace(config.train, head="sgd")  # it only loads heads: no statistics
        run = dataclasses.replace(config, client=client, data=data, train=train)
        self.runtime = ClientRuntime(run, token or "", tier="evaluator")
        test = eval_subset(config, self.runtime.dataset.test)
        self.test = EncodedSplit(self.runtime.backbone, test, config.train.max_length)
        self.family = self.runtime.spec.family
        self.next_version = 0
        if url is not None:
            self.runtime.register()

    @classmethod
    def for_config(
        cls, config: RunConfig, url: str | None, token: str | None
    ) -> dict[str, FamilyEvaluator]:
        """One evaluator per family of `evaluation_plan`, registered (it pins the family)."""
        plan = evaluation_plan(config)
        return {f: cls(config, backbone, rank, url, token) for f, (backbone, rank) in plan.items()}

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

    def save_final(self, folder: Path) -> Path:
        """Write the family's global model as last evaluated (the family bundle, the global
        branch and the head; no private branch) as ``adapter.safetensors`` with its backbone
        and class names, ready for `edgetune export --adapter`; plus a ``model.json`` card
        (`edgetune.protocol.final`, the format the server writes too)."""
        handle = self.runtime.handle
        groups = tuple(g for g in self.runtime.hooks.saved_groups if g != GROUP_PRIVATE)
        tensors = {n: t for g in groups for n, t in handle.state_dict_for(g).items()}
        meta = {**handle.metadata(), META_GROUPS: ",".join(groups)}
        path = write_final(folder, tensors, meta, self.next_version - 1)
        if isinstance(handle, LoraHandle) and peft_expressible(handle):  # PEFT's format too
            save_peft_adapter(handle, folder / "peft")
        if self.runtime.config.task == "lm":  # greedy continuations of fixed prompts
            from edgetune.client.lm import write_samples

            write_samples(self.runtime.task, self.runtime.backbone.tokenizer, folder)
        return path

    def evaluate_initial(self) -> dict[str, Any]:
        """The round-0 model without a server (local-only runs): the server's initial tensors."""
        self.runtime.load_initial()
        result = evaluate(self.runtime.task, self.test)
        return {"version": 0, "acc": result.accuracy, "loss": result.loss}

    def _clear_private(self) -> None:
        private = self.runtime.handle.state_dict_for(GROUP_PRIVATE)
        if private:
            zeros = {n: t.zero_() for n, t in private.items()}
            self.runtime.handle.load_group(GROUP_PRIVATE, zeros)


def eval_subset(config: RunConfig, test: Split) -> Split:
    """The test texts every global model and every reference row is scored on: the whole test
    split, or a seeded sample of ``data.eval_samples`` of it."""
    wanted = config.data.eval_samples
    if not wanted or wanted >= len(test):
        return test
    order = np.random.default_rng(config.seed).permutation(len(test))
    return test.subset(np.sort(order[:wanted]))


@functools.lru_cache(maxsize=64)
def family_of(backbone: str) -> str:
    """The family of a zoo name or model folder; each backbone is loaded once per process
    (simulate asks before it starts, again when it starts, and the references per family)."""
    return load_backbone(backbone).spec.family


def evaluation_plan(config: RunConfig) -> dict[str, tuple[str, int]]:
    """Family -> (backbone, rank) of its evaluator; refuses ranks the strategy cannot mix.

    The evaluator registers before any client, so its spec is the one the server pins for the
    family: it carries the rank every client of the family trains, or the largest one where
    the strategy lets ranks differ within a family (HetLoRA, FlexLoRA).
    """
    families: dict[str, list[tuple[str, int]]] = {}
    for group in config.groups:
        rank = config.client_rank(group.rank)
        for backbone in group.backbones:
            families.setdefault(family_of(backbone), []).append((backbone, rank))
    check_ranks(config, families)
    return {f: (ms[0][0], max(rank for _, rank in ms)) for f, ms in families.items()}


def check_ranks(config: RunConfig, families: dict[str, list[tuple[str, int]]]) -> None:
    """Per-group ranks only where the strategy allows them (`StrategyDef.rank_scope`)."""
    scope = config.strategy_def.rank_scope
    if scope == "client":
        return
    members = {f: [rank for _, rank in ms] for f, ms in families.items()}
    if scope == "run":  # FedAdapter: the global branch is r x r in every family
        members = {"run": [rank for ranks in members.values() for rank in ranks]}
    for where, ranks in members.items():
        if len(set(ranks)) > 1:
            raise ConfigError(
                f"strategy {config.strategy!r} trains one rank per {scope}, but the [[group]] "
                f"tables of {where!r} ask for ranks {sorted(set(ranks))}; give them one rank"
            )
