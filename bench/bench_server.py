"""Server benchmarks: fedadapter aggregation time and sustained uploads/s over loopback.

Run:  .venv/bin/python bench/bench_server.py            (writes bench/results/server.json)
      .venv/bin/python bench/bench_server.py --quick    (small sizes, for a smoke run)

Shapes: MiniLM-L6 size (6 layers, d=384, r=16, K=2 anchors, 4-class head) in 3 families of
that shape, i.e. ~80k parameters (~320 KB) per update. Aggregation is timed three ways: the
pure function on in-memory tensors (with and without conflict projection), the Strategy
(which re-validates every reply first), and the server's full round close (read blobs from
disk, decode, aggregate, write results, commit). Uploads/s is measured against a real
``python -m edgetune.server`` child process (SQLite synchronous=FULL, fsync'd blobs: the
durable default) with concurrent client threads, bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
from benchinfo import machine_info

from edgetune.config import RunConfig, ServerConfig
from edgetune.protocol import AdapterSpec, encode_update, initial_tensors
from edgetune.server.rounds import Coordinator
from edgetune.server.storage import Storage
from edgetune.strategies import GLOBAL, ClientUpdate, make_strategy
from edgetune.strategies.aggregation import fedadapter

ROOT = Path(__file__).resolve().parents[1]
JOIN = "bench-join-token-0123456789abcdef"
FAMILIES = ("minilm-a", "minilm-b", "minilm-c")


def minilm_spec(family: str) -> AdapterSpec:
    return AdapterSpec(
        family=family,
        fingerprint=f"fp-{family}",
        d_model=384,
        n_layers=6,
        rank=16,
        n_anchors=2,
        n_classes=4,
    )


def run_config(min_clients: int = 0) -> RunConfig:
    """The fedadapter run both the strategy and the in-process server are built from."""
    server = ServerConfig(min_clients=min_clients, beta=0.5, eta=1.0, project_conflicts=True)
    return RunConfig(strategy="fedadapter", seed=0, server=server)


def machine() -> dict[str, Any]:
    watched = ["server", "edgetune/protocol", "edgetune/strategies", "edgetune/config"]
    info = machine_info(watched, dirty_key="server_files_dirty")
    return info | {"torch_threads": torch.get_num_threads()}


def make_updates(n: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    gen = torch.Generator().manual_seed(seed)
    specs = [minilm_spec(f) for f in FAMILIES]
    glob, _ = initial_tensors(specs[0], 0)
    updates = []
    for i in range(n):
        spec = specs[i % len(specs)]
        t = {
            k: torch.randn(s.shape, generator=gen) * 0.01 for k, s in spec.upload_tensors().items()
        }
        updates.append(ClientUpdate(f"c{i}", spec.family, 10 + i % 50, t))
    return glob, updates


def _bench_size(n: int) -> dict[str, Any]:
    """The three variants are timed interleaved (A B C A B C ...) so load drift hits all."""
    strat = make_strategy(run_config())
    glob, updates = make_updates(n)
    specs = {u.client_id: minilm_spec(u.family) for u in updates}
    state = {GLOBAL: glob}
    variants = {
        "pure_no_projection": lambda: fedadapter(glob, updates, beta=0.5),
        "pure_projection": lambda: fedadapter(glob, updates, beta=0.5, project=True, seed=1),
        "strategy_with_reply_checks": lambda: strat.aggregate_round(1, state, updates, specs),
    }
    reps = 5
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        "bytes_per_update": sum(t.numel() * 4 for t in updates[0].tensors.values())
    }
    for name, ts in times.items():
        out[name] = {"min_s": min(ts), "median_s": statistics.median(ts), "repeats": reps}
    return out


def bench_aggregation(sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in sizes:
        out[str(n)] = _bench_size(n)
        print(f"aggregation n={n}: {json.dumps(out[str(n)])}", flush=True)
    return out


def bench_round_close(n: int) -> dict[str, Any]:
    """Full server round close: n accepted uploads in SQLite + blobs -> aggregate -> commit."""
    with tempfile.TemporaryDirectory() as tmp:
        storage = Storage(Path(tmp) / "state")
        coord = Coordinator(run_config(min_clients=n), storage, JOIN)
        _, updates = make_updates(n)
        specs = {f: minilm_spec(f) for f in FAMILIES}
        t_up = time.perf_counter()
        for u in updates:
            reg = coord.register(JOIN, specs[u.family].to_dict(), "fp32")
            client = coord.authenticate(reg["token"])
            body = encode_update(u.tensors, specs[u.family], 1, u.num_samples)
            status, _ = coord.submit_update(client, 1, body)
            assert status == 201
        t_up = time.perf_counter() - t_up
        t0 = time.perf_counter()
        coord.step()
        close_s = time.perf_counter() - t0
        assert storage.rounds()[0].state == "closed"
        storage.close()
    return {"n": n, "round_close_s": close_s, "in_process_register_and_upload_s": t_up}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_uploads(n_clients: int, workers: int, time_limit: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "EDGETUNE_JOIN_TOKEN": JOIN}
        args = [
            sys.executable,
            "-m",
            "edgetune.server",
            "--state",
            f"{tmp}/state",
            "--port",
            str(port),
        ]
        args += ["--set", f"server.min_clients={n_clients + 1}"]
        args += ["--set", "server.log_level='WARNING'"]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_up(url, proc)
            return _drive_uploads(url, n_clients, workers, time_limit)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def _drive_uploads(url: str, n_clients: int, workers: int, time_limit: float) -> dict[str, Any]:
    specs = [minilm_spec(f) for f in FAMILIES]
    http = httpx.Client(base_url=url, timeout=60)
    clients = []
    for i in range(n_clients):
        spec = specs[i % 3]
        r = http.post(
            "/v1/register",
            json={"spec": spec.to_dict()},
            headers={"Authorization": f"Bearer {JOIN}"},
        )
        r.raise_for_status()
        clients.append((r.json(), spec))
    gen = torch.Generator().manual_seed(0)
    bodies = []
    for _, spec in clients:  # distinct payloads: no blob de-duplication flatters the numbers
        t = {
            k: torch.randn(s.shape, generator=gen) * 0.01 for k, s in spec.upload_tensors().items()
        }
        bodies.append(encode_update(t, spec, 1, 10))
    local = threading.local()
    stop_at = time.perf_counter() + time_limit
    latencies: list[float] = []

    def upload(i: int) -> int:
        if time.perf_counter() > stop_at:
            return -1
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=url, timeout=60)
        reg, _ = clients[i]
        t0 = time.perf_counter()
        r = local.http.put(f"/v1/rounds/1/updates/{reg['client_id']}", content=bodies[i],
                           headers={"Authorization": f"Bearer {reg['token']}"})  # fmt: skip
        latencies.append(time.perf_counter() - t0)
        return r.status_code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        codes = list(pool.map(upload, range(n_clients)))
    wall = time.perf_counter() - t0
    ok = sum(c == 201 for c in codes)
    lat = sorted(latencies)
    return {
        "clients": n_clients,
        "concurrency": workers,
        "time_limit_s": time_limit,
        "accepted": ok,
        "other_status": sorted({c for c in codes if c != 201}),
        "wall_s": wall,
        "uploads_per_s": ok / wall,
        "mb_per_s": ok * len(bodies[0]) / wall / 1e6,
        "body_bytes": len(bodies[0]),
        "latency_p50_ms": 1000 * lat[len(lat) // 2],
        "latency_p95_ms": 1000 * lat[int(len(lat) * 0.95)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (server default: 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [10, 20] if args.quick else [10, 100, 1000]
    result: dict[str, Any] = {"benchmark": "server", "machine": machine(), "started": time.time()}
    result["config"] = {
        "families": list(FAMILIES),
        "spec": minilm_spec(FAMILIES[0]).to_dict(),
        "sizes": sizes,
    }
    result["aggregation"] = bench_aggregation(sizes)
    result["round_close"] = bench_round_close(20 if args.quick else 200)
    print(f"round close: {result['round_close']}", flush=True)
    result["uploads"] = [
        bench_uploads(n_clients=40 if args.quick else 1000, workers=w, time_limit=60.0)
        for w in (4, 8, 16)
    ]
    print(f"uploads: {json.dumps(result['uploads'])}", flush=True)
    n_top = str(sizes[-1])
    agg_top = result["aggregation"][n_top]["pure_projection"]["min_s"]
    result["headline"] = {
        f"fedadapter_{n_top}_updates_s": agg_top,
        "target_1000_updates_s": 2.0,
        "uploads_per_s_best": max(u["uploads_per_s"] for u in result["uploads"]),
        "target_uploads_per_s": 100,
        "ratio_projection_vs_plain": agg_top
        / result["aggregation"][n_top]["pure_no_projection"]["min_s"],
    }
    result["loadavg_1m_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["headline"], indent=2))


if __name__ == "__main__":
    main()
