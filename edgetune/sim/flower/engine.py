"""`edgetune simulate --engine flower`: a run config through Flower's simulation engine.

One virtual SuperNode per client of the ``[[group]]`` tables (partition-id = client index,
so client i holds shard i and runs its group's tier, as in our engine), the ClientApps in
Flower's Ray backend (``client_resources``: one CPU each, on loopback), the ServerApp in this
process running `EdgeTuneStrategy` with `GlobalEvaluation`. The outputs are our engine's:
``metrics.jsonl``, ``summary.json``, ``table.txt``, the plots, ``final/<family>/``, the
clients' ``clients/c<i>/rounds.jsonl``; plus ``flower_rounds.json`` (each round's
aggregated, failed and skipped clients) and the strategy's checkpoint in ``server/``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from edgetune.config import RunConfig, config_to_dict
from edgetune.errors import ConfigError, EdgeTuneError
from edgetune.sim.flower.env import apply_offline_env
from edgetune.sim.harness import check_runnable
from edgetune.sim.report import plot_title, write_plots

log = logging.getLogger("edgetune.flower")


def backend_config(cpus: int | None = None) -> dict[str, Any]:
    """Ray on loopback, ``cpus`` CPUs (default: all), one CPU per ClientApp, no dashboard."""
    total = cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": total,
            "include_dashboard": False,
            "_node_ip_address": "127.0.0.1",
            "log_to_driver": False,
        },
    }


def run_flower(
    config: RunConfig, out: Path, *, fail: str = "", cpus: int | None = None, name: str = ""
) -> dict[str, Any]:
    """Run ``config`` into ``out`` on Flower's simulation engine; returns the summary."""
    if not config.strategy_def.federated:
        raise ConfigError(f"strategy {config.strategy!r} has no server: use --engine edgetune")
    check_runnable(config)
    apply_offline_env()
    os.environ.setdefault("FLWR_HOME", str(out / "flower-home"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_dict(config), indent=1))
    started = time.perf_counter()
    summary = _simulate(config, out, fail, cpus, started)
    write_plots(out, title=plot_title(config.strategy, name, out, engine="Flower"))
    return summary


def _simulate(
    config: RunConfig, out: Path, fail: str, cpus: int | None, started: float
) -> dict[str, Any]:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from edgetune.sim.flower.client_app import make_client_app, parse_fail
    from edgetune.sim.flower.evaluate import (
        FlowerRoundTable,
        GlobalEvaluation,
        client_results,
        write_history,
    )
    from edgetune.sim.flower.strategy import EdgeTuneStrategy

    parse_fail(fail)  # a malformed drill is refused before anything starts
    table = FlowerRoundTable(out, config)
    strategy = EdgeTuneStrategy(config, out / "server", on_round=table.note_round)
    evaluation = GlobalEvaluation(config, strategy.inner, table)
    errors: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            strategy.start(grid, evaluate_fn=evaluation)
        except BaseException as exc:  # re-raised in the caller, not lost in Flower's thread
            errors.append(exc)
            raise

    defaults = {"config": str(out / "config.json"), "out": str(out), "fail": fail}
    run_simulation(server_app, make_client_app(defaults), config.num_clients,
                   backend_config=backend_config(cpus))  # fmt: skip
    if errors:
        raise EdgeTuneError(f"the Flower ServerApp failed: {errors[0]}") from errors[0]
    if strategy.state.round < config.rounds:
        raise EdgeTuneError(f"the Flower run stopped after round {strategy.state.round}")
    evaluation.save_finals(out)
    write_history(out, strategy.state.history)
    results = client_results(config, strategy.results, strategy.state.history)
    summary = table.finish(time.perf_counter() - started, results)
    summary["engine"] = "flower"
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
