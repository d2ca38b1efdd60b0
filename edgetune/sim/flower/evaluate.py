"""Server-side evaluation and the report of a Flower run: the same files as our engine.

`GlobalEvaluation` is the ``evaluate_fn`` of the Flower strategy: after round r it loads each
family's aggregated model (global branch + family bundle + head, private branch at zero) into
that family's `FamilyEvaluator` and scores it on the shared test split, exactly as our
engine's evaluator scores version r downloaded from our server. `FlowerRoundTable` is our
`RoundTable` plus, per round, the clients that failed or were skipped and why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord

from edgetune.client.trainer import evaluate
from edgetune.config import RunConfig
from edgetune.protocol import GROUP_GLOBAL, GROUP_PRIVATE, AdapterSpec
from edgetune.sim.evaluator import FamilyEvaluator
from edgetune.sim.flower.convert import unflatten_state
from edgetune.sim.report import RoundTable
from edgetune.strategies import GLOBAL, Strategy, family_model

log = logging.getLogger("edgetune.flower")


class GlobalEvaluation:
    """``evaluate_fn(round, arrays)``: each family's test accuracy, into ``table`` if given."""

    def __init__(
        self, config: RunConfig, strategy: Strategy, table: RoundTable | None = None
    ) -> None:
        self.evaluators = FamilyEvaluator.for_config(config, None, None)
        self.strategy = strategy
        self.table = table

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = unflatten_state(arrays.to_torch_state_dict())
        scores: dict[str, float] = {}
        for family, evaluator in self.evaluators.items():
            if family_model(family) not in state:
                continue  # a family no node of this run belongs to
            acc = self._score(evaluator, state, family, server_round)
            scores[f"acc/{family}"] = acc
            if self.table is not None:
                self.table.record(family, {"version": server_round, "acc": acc})
        return MetricRecord(scores)

    def _score(self, evaluator: FamilyEvaluator, state: dict, family: str, version: int) -> float:
        runtime = evaluator.runtime
        view = self.strategy.download_view(state[family_model(family)], runtime.spec)
        private = runtime.handle.state_dict_for(GROUP_PRIVATE)
        if private:  # the model a new client of the family starts from
            runtime.handle.load_group(GROUP_PRIVATE, {n: t.zero_() for n, t in private.items()})
        runtime.hooks.load_family(runtime.handle, view, version)
        if GLOBAL in state:
            runtime.handle.load_group(GROUP_GLOBAL, state[GLOBAL])
        evaluator.next_version = version + 1
        result = evaluate(runtime.task, evaluator.test)
        log.info("family %s version %d: test accuracy %.4f", family, version, result.accuracy)
        return result.accuracy

    def save_finals(self, out: Path) -> None:
        """Each family's model as last evaluated, as our engine writes it (`final/<family>`)."""
        for family, evaluator in self.evaluators.items():
            if evaluator.next_version > 0:
                evaluator.save_final(out / "final" / family)

    def specs(self) -> dict[str, AdapterSpec]:
        return {f: e.runtime.spec for f, e in self.evaluators.items()}


class FlowerRoundTable(RoundTable):
    """`RoundTable` whose rows also name the round's failed and skipped clients."""

    def __init__(self, out: Path, config: RunConfig) -> None:
        super().__init__(out, config)
        self.history: dict[int, dict[str, Any]] = {}

    def note_round(self, entry: dict[str, Any]) -> None:
        self.history[int(entry["round"])] = entry
        self.refresh()

    def _build_rows(self) -> list[dict[str, Any]]:
        rows = super()._build_rows()
        for row in rows:
            entry = self.history.get(row["round"], {})
            row["engine"] = "flower"
            row["failed"] = entry.get("failed", []) + entry.get("skipped", [])
            row["aggregated"] = entry.get("aggregated", 0 if row["round"] else None)
        return rows


def client_results(config: RunConfig, results: dict[str, dict[str, float]],
                   history: list[dict[str, Any]]) -> list[dict[str, Any]]:  # fmt: skip
    """One entry per client in index order, as our engine's; ``returncode`` 1 for a client
    that gave no final result or was not aggregated in the last round."""
    last = history[-1] if history else {}
    failed_last = {f["client"] for f in last.get("failed", []) + last.get("skipped", [])}
    out = []
    for index in range(config.num_clients):
        name = f"c{index}"
        result = results.get(name)
        code = 0 if result is not None and name not in failed_last else 1
        out.append({"client": index, "returncode": code, **(result or {})})
    return out


def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    (out / "flower_rounds.json").write_text(json.dumps(history, indent=1))
