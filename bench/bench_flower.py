"""Scale on Flower: many virtual clients of a tiny model on this machine, beside our engine.

    python bench/bench_flower.py [--clients 100] [--compare 20] [--rounds 1] [--cpus 2]

Runs `edgetune simulate --engine flower` (Flower's simulation engine, Ray backend, one CPU per
ClientApp) with ``--clients`` virtual clients of two tiny BERT families, then the same config
at ``--compare`` clients on both engines (our engine starts one process per client, so 100
of them do not fit in memory here). Wall time and the peak resident memory of this process
and all its descendants (Ray's GCS, raylet and workers; our server and client processes),
sampled every 0.25 s, are written to ``bench/results/flower_scale.json`` with the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchinfo import ROOT, machine_info

from edgetune.config import load_config

TINY = ROOT / "tests" / "data" / "tiny_sim.toml"


class PeakRss:
    """Peak summed RSS of this process tree, sampled in a thread."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def config_for(clients: int, rounds: int):
    """Two tiny families, half the clients each, near-IID shards (no client without data)."""
    half = clients // 2
    groups = (f'group=[{{backbone="tiny-bert-d32-l2", count={clients - half}}}, '
              f'{{backbone="tiny-bert-d48-l3", count={half}}}]')  # fmt: skip
    per_class = max(40, 8 * clients)
    overrides = [f"rounds={rounds}", groups, "data.alpha=100.0", f"data.max_per_class={per_class}",
                 "data.eval_samples=60", "server.round_timeout_s=1800.0"]  # fmt: skip
    return load_config(TINY, overrides)


def measure(engine: str, clients: int, rounds: int, cpus: int) -> dict[str, Any]:
    config = config_for(clients, rounds)
    out = Path(tempfile.mkdtemp(prefix=f"bench-flower-{engine}-"))
    started = time.perf_counter()
    with PeakRss() as rss:
        if engine == "flower":
            from edgetune.sim.flower.engine import run_flower

            summary = run_flower(config, out, cpus=cpus)
        else:
            from edgetune.sim.harness import run_simulation

            summary = run_simulation(config, out)
    wall = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    ok = sum(c["returncode"] == 0 for c in summary["clients"])
    return {
        "engine": engine, "clients": clients, "rounds": rounds, "clients_ok": ok,
        "final_round": summary["final_round"], "wall_s": round(wall, 1),
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "peak_rss_mb_per_client": round(rss.peak / 2**20 / clients, 2),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--compare", type=int, default=20, help="clients on both engines (0: skip)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "flower_scale.json"
    )
    args = parser.parse_args()
    import flwr
    import ray

    record: dict[str, Any] = {
        "machine": machine_info(["edgetune/sim", "bench/bench_flower.py"]),
        "versions": {"flwr": flwr.__version__, "ray": ray.__version__},
        "command": "python " + " ".join(sys.argv),
        "runs": [],
    }
    plan = [("flower", args.clients)]
    if args.compare:
        plan += [("flower", args.compare), ("edgetune", args.compare)]
    for engine, clients in plan:
        record["runs"].append(measure(engine, clients, args.rounds, args.cpus))
        print(json.dumps(record["runs"][-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
