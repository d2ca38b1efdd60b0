"""`edgetune simulate`: a real server and N real client processes on loopback, R rounds.

The harness starts `python -m edgetune.server` on a free loopback port with a fresh state dir,
spawns one `python -m edgetune.client.runtime` process per simulated client (each with one torch
thread, so six clients share two cores fairly), and evaluates the server's models itself: after
every aggregated version it downloads the global and family tensors (as an extra registered
client of each family that never uploads) and measures test accuracy on the shared test split.
Clients write one JSON line per round (bytes up/down, personal accuracy, FLOPs) into their
folders; the harness merges them into `metrics.jsonl`, `summary.json` and two PNG plots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from edgetune.config import ClientConfig, RunConfig, config_to_dict
from edgetune.errors import ConfigError, EdgeTuneError
from edgetune.sim.evaluator import FamilyEvaluator, evaluation_plan
from edgetune.sim.report import RoundTable, plot_title, write_plots

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_configs(
    config: RunConfig, out: Path, url: str, shards: ShardPlan | None = None
) -> list[RunConfig]:
    """One run config per simulated client, in `RunConfig.client_slots` order: the run's,
    with ``[client]`` filled from its ``[[group]]`` and its device's shard, and its own
    shuffling seed (a device's ``also`` clients train on the same shard).

    ``shards`` (default: device i holds shard i of ``num_devices``) lets a run of some of the
    groups give its devices the shards they hold in the whole run (the `isolated` reference).
    """
    ids, total = shards or (list(range(config.num_devices)), config.num_devices)
    configs = []
    for index, (device, group, backbone) in enumerate(config.client_slots()):
        shard = ids[device]
        client = ClientConfig(
            url=url,
            state_dir=str(out / "clients" / f"c{index}"),
            backbone=backbone,
            quant=group.quant,
            rank=group.rank,
            shard=shard,
            shards=total,
            max_rounds=config.rounds,
            # the device's first client pairs its features with the device's other backbones
            bridges=group.also if backbone == group.backbone else (),
            stats_source=backbone == group.backbone,
        )
        train = dataclasses.replace(config.train, seed=config.seed * 1000 + shard)
        configs.append(dataclasses.replace(config, client=client, train=train))
    return configs


def check_runnable(config: RunConfig) -> None:
    """What simulate refuses before it writes or starts anything: no clients, a quorum above
    the client count (the run would wait for every deadline), ranks the strategy cannot mix."""
    if not config.groups:
        raise ConfigError("simulate needs at least one [[group]] table of clients")
    if config.server.min_clients > config.num_clients:
        raise ConfigError(
            f"server.min_clients={config.server.min_clients} exceeds the "
            f"{config.num_clients} clients of the [[group]] tables: no round could close"
        )
    evaluation_plan(config)


def prepare_out(out: Path, overwrite: bool, resume: RunConfig | None = None) -> None:
    """Refuse an output folder that holds anything, unless ``overwrite`` (then empty it) or
    ``resume`` (the config that must equal the one the folder's run was started with)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    used = out.is_dir() and any(out.iterdir())
    if resume is not None:
        if not used:
            raise ConfigError(f"--resume: {out} holds no run to continue")
        check_same_config(out, resume)
    elif used:
        if not overwrite:
            raise ConfigError(
                f"--out {out} already holds a run; choose another folder, pass --resume (same "
                "config: continue it) or --overwrite (which deletes what is there)"
            )
        shutil.rmtree(out)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {
            k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()
        }
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return {
            k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}{i}.").items()
        }
    return {prefix.rstrip("."): value}


def check_same_config(out: Path, config: RunConfig) -> None:
    """``out/config.json`` (written when the run started) equals ``config``, else one line
    naming the first keys that differ."""
    try:
        stored = _flat(json.loads((out / "config.json").read_text()))
    except (OSError, ValueError) as err:
        raise ConfigError(f"--resume: {out} holds no readable config.json ({err})") from err
    wanted = _flat(json.loads(json.dumps(config_to_dict(config))))
    differ = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
    if differ:
        shown = ", ".join(
            f"{k} ({stored.get(k)!r} there, {wanted.get(k)!r} here)" for k in differ[:3]
        )
        raise ConfigError(
            f"--resume: the config differs from the run in {out}: {shown}; resume with the "
            "same config, or use --overwrite or another --out"
        )


def _show_progress(bar: tqdm, info: dict[str, Any], table: RoundTable) -> None:
    """Closed rounds on the bar (with its ETA), the newest global accuracy per family on it,
    and the per-round table growing above it."""
    closed = info["round"] if info["finished"] else info["round"] - 1
    for line in table.grown_lines(closed):
        bar.write(line)
    if closed > bar.n:
        bar.update(closed - bar.n)
        latest = table.rows[-1]["global_acc"] if table.rows else {}
        bar.set_postfix({f[:12]: f"{100 * a:.1f}%" for f, a in latest.items()})


#: (shard of each client in group order, shards in all)
ShardPlan = tuple[list[int], int]


class Simulation:
    """Owns the server and client processes of one run; `run()` returns the summary."""

    def __init__(self, config: RunConfig, out: Path, shards: ShardPlan | None = None) -> None:
        self.config = config
        self.shards = shards
        self.out = out
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_urlsafe(24)
        self.server: subprocess.Popen | None = None
        self.clients: list[subprocess.Popen] = []
        self.started = time.perf_counter()

    # -- processes -------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(
            os.environ,
            EDGETUNE_JOIN_TOKEN=self.token,
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        return env

    def start_server(self) -> None:
        """`python -m edgetune.server` on this run's config (written as JSON), on loopback."""
        server = dataclasses.replace(
            self.config.server, host="127.0.0.1", port=self.port, min_clients=self.config.quorum
        )
        run_file = self.out / "server" / "run.json"
        run_file.parent.mkdir(parents=True, exist_ok=True)
        run_file.write_text(
            json.dumps(config_to_dict(dataclasses.replace(self.config, server=server)), indent=1)
        )
        cmd = [sys.executable, "-m", "edgetune.server", "--state", str(self.out / "server")]
        cmd += ["--config", str(run_file)]
        log_file = (self.out / "server.log").open("ab")
        self.server = subprocess.Popen(cmd, env=self._env(), stdout=log_file, stderr=log_file)
        self._wait_healthy()

    def _wait_healthy(self, timeout_s: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.server is not None and self.server.poll() is not None:
                raise EdgeTuneError(
                    f"server exited with {self.server.returncode}; see {self.out / 'server.log'}"
                )
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise EdgeTuneError(f"server did not answer /v1/health within {timeout_s:.0f}s")

    def start_clients(self) -> None:
        for config in client_configs(self.config, self.out, self.url, self.shards):
            folder = Path(config.client.state_dir)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(config_to_dict(config), indent=1))
            log_file = (folder / "client.log").open("ab")
            cmd = [sys.executable, "-m", "edgetune.client", "--config", str(folder / "config.json")]
            cmd += ["--result", str(folder / "result.json")]
            self.clients.append(
                subprocess.Popen(cmd, env=self._env(), stdout=log_file, stderr=log_file)
            )

    def stop(self) -> None:
        for proc in [*self.clients, self.server]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.clients, self.server]:
            if proc is not None:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        check_runnable(self.config)  # before anything is written
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(config_to_dict(self.config), indent=1))
        table = RoundTable(self.out, self.config)
        try:
            if not self.config.strategy_def.federated:
                return self._run_local(table)
            self.start_server()
            evaluators = FamilyEvaluator.for_config(self.config, self.url, self.token)
            self._evaluate(evaluators, table)
            self.start_clients()
            self._follow(evaluators, table)
            for family, evaluator in evaluators.items():
                log.info(
                    "final model of %s: %s",
                    family,
                    evaluator.save_final(self.out / "final" / family),
                )
        finally:
            self.stop()
        return table.finish(time.perf_counter() - self.started, self._client_results())

    def _run_local(self, table: RoundTable) -> dict[str, Any]:
        evaluators = FamilyEvaluator.for_config(self.config, None, None)
        for family, evaluator in evaluators.items():
            table.record(family, evaluator.evaluate_initial())
        self.start_clients()
        self._wait_clients(timeout_s=None)  # local runs have no server deadline to bound them
        table.refresh()
        return table.finish(time.perf_counter() - self.started, self._client_results())

    def _follow(self, evaluators: dict[str, FamilyEvaluator], table: RoundTable) -> None:
        """Evaluate every new aggregate until the server has run all rounds.

        Clients that finished their rounds exit before the server closes the last one (it may
        wait for a dead client's deadline), so their exit alone does not end the run; a run
        whose server makes no progress for a whole round timeout after they exited does.
        """
        grace_until = None
        bar = tqdm(total=self.config.rounds, desc="rounds", unit="round", dynamic_ncols=True)
        while True:
            info = next(iter(evaluators.values())).current_round()
            self._evaluate(evaluators, table)
            _show_progress(bar, info, table)
            if info["finished"]:
                break
            if all(p.poll() is not None for p in self.clients):
                grace_until = (
                    grace_until or time.monotonic() + 2 * self.config.server.round_timeout_s + 30
                )
                if time.monotonic() > grace_until:
                    log.error("clients exited and round %s never closed; stopping", info["round"])
                    break
            time.sleep(0.5)
        bar.close()
        self._wait_clients()
        self._evaluate(evaluators, table)

    @staticmethod
    def _evaluate(evaluators: dict[str, FamilyEvaluator], table: RoundTable) -> None:
        for family, evaluator in evaluators.items():
            for result in evaluator.evaluate_new():
                table.record(family, result)

    def _wait_clients(self, timeout_s: float | None = 600.0) -> None:
        """Wait for every client process; past `timeout_s` (None: forever) kill the stragglers."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for proc in self.clients:
            try:
                proc.wait(
                    timeout=None if deadline is None else max(1.0, deadline - time.monotonic())
                )
            except subprocess.TimeoutExpired:
                log.error("client %d did not finish; terminating it", proc.pid)
                proc.kill()

    def _client_results(self) -> list[dict[str, Any]]:
        results = []
        for index, proc in enumerate(self.clients):
            path = self.out / "clients" / f"c{index}" / "result.json"
            result = json.loads(path.read_text()) if path.is_file() else {}
            results.append({"client": index, "returncode": proc.returncode, **result})
        return results


def run_simulation(
    config: RunConfig, out: Path, shards: ShardPlan | None = None, *, name: str = ""
) -> dict[str, Any]:
    """Run ``config`` (a federated or local strategy, from the config file called ``name``)
    into ``out``; reference rows are `edgetune.sim.references.run_reference`."""
    if config.strategy_def.reference:
        raise ConfigError(f"strategy {config.strategy!r} is a reference row: use run_reference")
    summary = Simulation(config, out, shards).run()
    write_plots(out, title=plot_title(config.strategy, name, out))
    return summary
