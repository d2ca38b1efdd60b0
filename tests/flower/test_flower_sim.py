"""Flower's simulation engine against our own: same tensors, failures skipped, resume."""

import json
import shutil

import pytest
import torch
from conftest import TINY, TWO_FAMILIES

from edgetune.config import load_config
from edgetune.protocol import decode_payload
from edgetune.server.storage import Storage
from edgetune.sim.flower.checkpoint import load_checkpoint
from edgetune.sim.flower.engine import run_flower
from edgetune.sim.harness import run_simulation


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _server_models(state_dir):
    """Every model our server stored, as of its latest version: name -> (version, tensors)."""
    storage = Storage(state_dir)
    try:
        names = ["global", *(f"family/{f}" for f in storage.families())]
        found = {n: storage.latest_model(n) for n in names}
        return {
            n: (v, decode_payload(storage.blobs.get(d)).tensors)
            for n, (v, d) in ((n, x) for n, x in found.items() if x is not None)
        }
    finally:
        storage.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy", ["fedadapter", pytest.param("fedavg-lora", marks=pytest.mark.heavy)]
)
def test_one_round_on_flower_aggregates_what_our_server_aggregates(tmp_path, strategy):
    """Same config, seed and clients: our server's round-1 models and the Flower strategy's
    round-1 checkpoint hold the same tensors (FedAdapter: two families and the global branch
    shared across them; FedAvg-LoRA: one model per family)."""
    config = load_config(TINY, ["rounds=1", f'strategy="{strategy}"', TWO_FAMILIES])
    run_simulation(config, tmp_path / "ours")
    summary = run_flower(config, tmp_path / "flower", cpus=2)
    ours = _server_models(tmp_path / "ours" / "server")
    theirs = load_checkpoint(tmp_path / "flower" / "server")
    assert theirs is not None and theirs.round == 1
    families = {"family/tiny-bert-d32-l2", "family/tiny-bert-d48-l3"}
    expected = families | ({"global"} if strategy == "fedadapter" else set())
    assert set(theirs.models) == set(ours) == expected
    worst = 0.0
    for name, tensors in theirs.models.items():
        version, stored = ours[name]
        # round 1 gathers class statistics: only the family heads change, not the global branch
        want = 0 if name == "global" else 1
        assert version == theirs.versions[name] == want, name
        assert set(stored) == set(tensors), name
        for key, value in tensors.items():
            assert value.dtype == stored[key].dtype
            worst = max(worst, (value.double() - stored[key].double()).abs().max().item())
    assert worst <= 1e-6
    assert any(t.abs().sum() > 0 for t in theirs.models[sorted(families)[0]].values())
    rows = _metrics(tmp_path / "flower")  # the same report files as our engine
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] == 2
    assert summary["final_round"] == 1 and summary["engine"] == "flower"
    for name in ("summary.json", "table.txt", "accuracy_vs_round.png", "accuracy_vs_mb.png"):
        assert (tmp_path / "flower" / name).stat().st_size > 0
    assert all(c["returncode"] == 0 and "personal_test_acc" in c for c in summary["clients"])


@pytest.mark.slow
def test_a_client_raising_in_round_1_is_skipped_and_a_restarted_run_continues(tmp_path):
    """Client c1 raises in round 1: the round aggregates c0 alone, the failure is in the
    metrics, round 2 takes both. A second start with rounds=3 on the same folder resumes from
    the strategy's checkpoint and runs round 3 only, from the round-2 models."""
    out = tmp_path / "run"
    config = load_config(TINY, ["rounds=2", TWO_FAMILIES])
    summary = run_flower(config, out, fail="c1@1", cpus=2)
    rows = _metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["clients"] == 1 and rows[1]["aggregated"] == 1
    assert [f["client"] for f in rows[1]["failed"]] == ["c1"]
    assert "injected failure in round 1" in rows[1]["failed"][0]["reason"]
    assert rows[2]["clients"] == 2 and rows[2]["aggregated"] == 2 and rows[2]["failed"] == []
    assert summary["final_round"] == 2 and all(c["returncode"] == 0 for c in summary["clients"])
    after_two = load_checkpoint(out / "server")
    assert after_two.versions["family/tiny-bert-d48-l3"] == 2  # c1's family: carried in round 1
    assert after_two.accepted == {"c0": 2, "c1": 2}

    shutil.copytree(out / "server", tmp_path / "round2")
    run_flower(load_config(TINY, ["rounds=3", TWO_FAMILIES]), out, cpus=2)
    resumed = load_checkpoint(out / "server")
    assert resumed.round == 3 and [h["round"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[2]["aggregated"] == 2
    for client in ("c0", "c1"):
        lines = (out / "clients" / client / "rounds.jsonl").read_text().splitlines()
        assert [json.loads(x)["round"] for x in lines] == ([2] if client == "c1" else [1, 2]) + [3]
    changed = [
        n for n, ts in resumed.models.items()
        if any(not torch.equal(t, after_two.models[n][k]) for k, t in ts.items())
    ]  # fmt: skip
    # round 3, the final round of a 3-round run, gathers class statistics: every family's head
    # is fit again, the global branch (nothing trained) stays
    assert sorted(changed) == sorted(n for n in resumed.models if n != "global")
