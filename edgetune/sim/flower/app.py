"""Deployment: the ServerApp for a SuperLink and the Flower app folder that names our apps.

``python -m edgetune.sim.flower app --config run.toml --out runs/fl DIR`` writes ``DIR/``:
a ``pyproject.toml`` whose components are ``edgetune.sim.flower.app:server_app`` and
``edgetune.sim.flower.client_app:app`` and whose ``[tool.flwr.app.config]`` carries the run
config path and the output folder (absolute), plus ``flwr-config.toml`` (the ``[superlink]``
connection for ``$FLWR_HOME/config.toml``) and ``commands.sh`` (the SuperLink, SuperNode and
``flwr run`` commands, TLS and node authentication included). The folder holds no data or
weights: Flower bundles it into a FAB (10 MB at most) and every machine of the federation
needs ``edgetune[flower]``, its backbones and data locally.

The ServerApp reads run config keys ``config`` and ``out``; ``min-nodes`` (nodes to wait for
before the describe round, default the config's client count), ``evaluate`` (score each
family's global model after every round on this machine, default true) and ``fail`` (the
ClientApp's fault drill). Its checkpoint is ``<out>/server/``: run ``flwr run`` again after a
SuperLink restart and it continues after the last finished round.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from edgetune.config import load_config
from edgetune.sim.flower.env import apply_offline_env, export_lines
from edgetune.sim.flower.evaluate import (
    FlowerRoundTable,
    GlobalEvaluation,
    client_results,
    write_history,
)
from edgetune.sim.flower.strategy import EdgeTuneStrategy

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured strategy on the SuperLink's nodes; write our reports to ``out``."""
    apply_offline_env()
    settings = dict(context.run_config)
    config = load_config(str(settings["config"]))
    out = Path(str(settings["out"]))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    table = FlowerRoundTable(out, config)
    strategy = EdgeTuneStrategy(config, out / "server", on_round=table.note_round)
    strategy.expected_nodes = int(settings.get("min-nodes", config.num_clients) or 1)
    evaluation = (
        GlobalEvaluation(config, strategy.inner, table) if settings.get("evaluate", True) else None
    )
    strategy.start(grid, evaluate_fn=evaluation)
    write_history(out, strategy.state.history)
    if evaluation is not None:
        evaluation.save_finals(out)
    results = client_results(config, strategy.results, strategy.state.history)
    summary = table.finish(time.perf_counter() - started, results)
    (out / "summary.json").write_text(
        json.dumps({**summary, "engine": "flower-deployment"}, indent=1)
    )


PYPROJECT = """\
# A Flower app that runs EdgeTune (written by `python -m edgetune.sim.flower app`).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgetune-flower-app"
version = "1.0.0"
description = "EdgeTune's strategies and client runtime on Flower"
license = "Apache-2.0"
dependencies = ["edgetune[flower]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "edgetune"

[tool.flwr.app.components]
serverapp = "edgetune.sim.flower.app:server_app"
clientapp = "edgetune.sim.flower.client_app:app"

[tool.flwr.app.config]
{config}
"""


def app_config(config: Path, out: Path, **extra: Any) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` values (absolute paths; ``extra`` keys added as given)."""
    return {"config": str(config.resolve()), "out": str(out.resolve()), "evaluate": True,
            "fail": "", **extra}  # fmt: skip


def connection_toml(name: str, address: str, ca_cert: Path | None = None) -> str:
    """A ``[superlink.<name>]`` connection for ``$FLWR_HOME/config.toml``."""
    lines = [
        "[superlink]",
        f'default = "{name}"',
        "",
        f"[superlink.{name}]",
        f'address = "{address}"',
    ]
    lines.append(f'root-certificates = "{ca_cert.resolve()}"' if ca_cert else "insecure = true")
    return "\n".join(lines) + "\n"


def write_app(folder: Path, config: Path, out: Path, **extra: Any) -> Path:
    """Write the app folder (pyproject, connection, commands); returns its pyproject path."""
    folder.mkdir(parents=True, exist_ok=True)
    values = "\n".join(
        f"{k} = {json.dumps(v)}" for k, v in app_config(config, out, **extra).items()
    )
    (folder / "pyproject.toml").write_text(PYPROJECT.format(config=values))
    (folder / "flwr-config.toml").write_text(connection_toml("edgetune", "127.0.0.1:9093"))
    (folder / "commands.sh").write_text(commands(folder, load_config(config).num_clients))
    return folder / "pyproject.toml"


def commands(folder: Path, nodes: int) -> str:
    """The deployment commands, in order, for a federation of ``nodes`` SuperNodes."""
    node_lines = "\n".join(
        f"flower-supernode --root-certificates certs/ca.crt --superlink $LINK:9093 "
        f"--auth-supernode-private-key keys/node{i} --port {9100 + i} "
        f"--node-config 'partition-id={i} num-partitions={nodes}' &"
        for i in range(nodes)
    )
    register = "\n".join(f"flwr supernode register keys/node{i}.pub edgetune" for i in range(nodes))
    return f"""#!/usr/bin/env bash
# EdgeTune on Flower's deployment engine (see README "Scale out on Flower"). Run each block on
# the machine named in its comment; every machine needs `pip install 'edgetune[flower]'`.
set -euo pipefail
{export_lines()}
export FLWR_HOME=${{FLWR_HOME:-$HOME/.flwr}}
LINK=${{LINK:-127.0.0.1}}

# SuperLink machine: TLS + SuperNode authentication, state in SQLite.
flower-superlink --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/server.pem \\
  --ssl-keyfile certs/server.key --enable-supernode-auth --host 0.0.0.0 --port 9093 \\
  --database flower-state.db --disable-runtime-dependency-installation &

# Operator: the connection, then one registered key per device (ssh-keygen -t ecdsa -b 384).
mkdir -p "$FLWR_HOME" && sed "s#insecure = true#root-certificates = \\"$PWD/certs/ca.crt\\"#; s#127.0.0.1#$LINK#" \\
  {folder.resolve()}/flwr-config.toml > "$FLWR_HOME/config.toml"
{register}

# Each device i (partition-id = its client index in the run config's [[group]] tables):
{node_lines}

# Operator: start the run (again after a SuperLink restart: it resumes from <out>/server/).
flwr run {folder.resolve()} edgetune --stream
"""
