"""Flower's deployment engine on loopback: a SuperLink, two SuperNodes, `flwr run`."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY

from edgetune.sim.flower.app import connection_toml, write_app
from edgetune.sim.flower.checkpoint import load_checkpoint
from edgetune.sim.harness import free_port

BIN = Path(sys.executable).parent
GROUPS = '[[group]]\nbackbone = "tiny-bert-d32-l2"\n\n[[group]]\nbackbone = "tiny-bert-d48-l3"\n'


def _two_family_config(folder: Path) -> Path:
    """tiny_sim.toml with one client per family and two rounds."""
    text = TINY.read_text().split("[[group]]", 1)[0]  # rounds = 2 already
    path = folder / "run.toml"
    path.write_text(text + GROUPS)
    return path


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    """A daemon in its own process group (its SuperExec and app processes die with it)."""
    handle = log.open("ab")
    return subprocess.Popen(cmd, stdout=handle, stderr=handle, start_new_session=True, env=_env())


def _env() -> dict[str, str]:
    """Daemons start `flower-superexec`, `flwr-serverapp`, `flwr-clientapp` by name."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _wait_listening(port: int, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the SuperLink exited at start-up (see superlink.log)"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"the SuperLink did not listen on {port} within {timeout_s:.0f} s")


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.heavy  # ~100 s: every message starts a fresh ClientApp process (torch import)
def test_a_superlink_and_two_supernodes_run_two_rounds(tmp_path):
    config = _two_family_config(tmp_path)
    out, app = tmp_path / "out", tmp_path / "app"
    write_app(app, config, out, **{"min-nodes": 2})
    link = free_port()
    home = Path(os.environ["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(connection_toml("loopback", f"127.0.0.1:{link}"))
    superlink = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                 "--port", str(link), "--database", str(tmp_path / "link.db")]  # fmt: skip
    procs = [_start(superlink, tmp_path / "superlink.log")]
    try:
        _wait_listening(link, procs[0])
        for i in range(2):
            node = [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                    f"127.0.0.1:{link}", "--port", str(free_port()),
                    "--node-config", f"partition-id={i} num-partitions=2"]  # fmt: skip
            procs.append(_start(node, tmp_path / f"supernode{i}.log"))
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(app), "loopback", "--stream"],
            capture_output=True, text=True, timeout=400, env=_env(),
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        _stop(procs)
    assert all(proc.poll() is not None for proc in procs)  # nothing left running
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 2 and r["aggregated"] == 2 and not r["failed"] for r in rows[1:])
    assert set(rows[-1]["global_acc"]) == {"tiny-bert-d32-l2", "tiny-bert-d48-l3"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "flower-deployment" and summary["final_round"] == 2
    assert [c["returncode"] for c in summary["clients"]] == [0, 0]
    checkpoint = load_checkpoint(out / "server")
    assert checkpoint.round == 2 and checkpoint.accepted == {"c0": 2, "c1": 2}
