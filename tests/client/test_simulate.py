"""`edgetune simulate` end to end: a real server and real client processes over loopback HTTP."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgetune.config import RunConfig, config_reference, load_config
from edgetune.errors import ConfigError
from edgetune.sim.harness import Simulation, run_simulation

TINY = Path(__file__).parents[1] / "data" / "tiny_sim.toml"
README = Path(__file__).parents[2] / "README.md"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_run_over_http_writes_every_output(tmp_path):
    summary = run_simulation(load_config(TINY), tmp_path)
    rows = _metrics(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    families = {"tiny-bert-d32-l2", "tiny-bert-d48-l3"}
    for row in rows:  # every version of every family was evaluated, none skipped by a race
        assert set(row["global_acc"]) == families
    for row in rows[1:]:
        assert row["clients"] == 3 and row["bytes_up"] > 0 and row["bytes_down"] > 0
    # round 1 gathers class statistics (server-fit heads: nothing trains), round 2 trains
    assert rows[1]["train_gflops_est"] == 0 and rows[2]["train_gflops_est"] > 0
    sent = sum(
        json.loads(x)["bytes_up"]
        for c in (tmp_path / "clients").iterdir()
        for x in (c / "rounds.jsonl").read_text().splitlines()
    )
    assert summary["mb_up_total"] == pytest.approx(sent / 1e6)
    assert summary["final_round"] == 2 and set(summary["final_global_acc"]) == families
    for name in ("summary.json", "accuracy_vs_round.png", "accuracy_vs_mb.png", "table.txt"):
        assert (tmp_path / name).stat().st_size > 0
    assert all(c["returncode"] == 0 for c in summary["clients"])
    _export_and_infer_the_final_model(tmp_path, "tiny-bert-d48-l3")


def _export_and_infer_the_final_model(out: Path, family: str) -> None:
    """What a newcomer does next: export a family's final model without naming its backbone
    or its classes, then classify a text with ONNX Runtime and read a real class name."""
    card = json.loads((out / "final" / family / "model.json").read_text())
    assert card["backbone"] == family and card["version"] == 2
    assert card["classes"] == ["computers", "food", "law"]
    adapter = out / "final" / family / "adapter.safetensors"
    export = _edgetune("export", "--adapter", str(adapter), "--out", str(out / "onnx"))
    assert export.returncode == 0, export.stderr
    assert " INFO " not in export.stderr  # onnxscript's per-node notes stay quiet
    infer = _edgetune("infer", "--model", str(out / "onnx"), "--text", "a recipe for pasta")
    assert infer.returncode == 0, infer.stderr
    assert infer.stdout.split("\t", 1)[0] in card["classes"]


def _edgetune(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edgetune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ['strategy="flora"'],  # LoRA path: stacked factors folded into the layers each round
        [
            'strategy="hetlora"',
            'group=[{backbone="tiny-bert-d32-l2", rank=2}, '
            '{backbone="tiny-bert-d32-l2", rank=4}, {backbone="tiny-bert-d48-l3"}]',
        ],
        [  # per-group ranks where the family spec is pinned by the evaluator first
            'group=[{backbone="tiny-bert-d32-l2", rank=6, count=2}, '
            '{backbone="tiny-bert-d48-l3", rank=6}]',
        ],
        ['comm.compression="int8"', "comm.family_every=2"],
    ],  # int8 + error feedback, partial
    ids=["flora", "hetlora-ranks", "fedadapter-group-ranks", "fedadapter-int8-family-every-2"],
)
def test_other_strategies_and_comm_knobs_run_end_to_end(tmp_path, overrides):
    config = load_config(TINY, overrides)
    summary = run_simulation(config, tmp_path)
    for family in ("tiny-bert-d32-l2", "tiny-bert-d48-l3"):  # the final model of each family
        final = tmp_path / "final" / family
        assert (final / "adapter.safetensors").is_file()
        peft = config.strategy_def.adapter == "lora" and config.strategy != "flora"  # folded
        assert (final / "peft" / "adapter_config.json").is_file() == peft
    rows = _metrics(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(c["returncode"] == 0 for c in summary["clients"])
    assert set(rows[-1]["global_acc"]) == {"tiny-bert-d32-l2", "tiny-bert-d48-l3"}
    assert all(r["clients"] == 3 and r["bytes_up"] > 0 for r in rows[1:])


@pytest.mark.slow
def test_local_only_baseline_runs_without_a_server(tmp_path):
    summary = run_simulation(load_config(TINY, ['strategy="local"']), tmp_path)
    rows = _metrics(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["bytes_up"] == 0 and r["bytes_down"] == 0 for r in rows)
    assert all(r["clients"] == 3 and r["personal_acc"] for r in rows[1:])
    assert summary["final_global_acc"] == {}  # no server model exists in a local-only run
    assert set(summary["final_personal_test_acc"]) == {"tiny-bert-d32-l2", "tiny-bert-d48-l3"}
    assert not (tmp_path / "server").exists()


@pytest.mark.slow
def test_killing_a_client_mid_run_does_not_stop_it(tmp_path):
    """SIGKILL one client once it has registered (it is then fetching or training round 1).

    Depending on timing it may or may not have uploaded round 1 first; either way round 2 can
    only close at its deadline without it, and the run must still finish every round.
    """
    config = load_config(TINY, ["server.round_timeout_s=15.0", "rounds=2"])
    sim = Simulation(config, tmp_path)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(sim.run()), daemon=True)
    thread.start()
    registered = tmp_path / "clients" / "c2" / "client.json"
    deadline = time.monotonic() + 180
    while not registered.is_file() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert registered.is_file(), "the third client never registered"
    sim.clients[2].kill()
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert result["final_round"] == 2
    rows = _metrics(tmp_path)
    assert rows[1]["clients"] in (2, 3) and rows[2]["clients"] == 2
    assert set(rows[-1]["global_acc"]) == {"tiny-bert-d32-l2", "tiny-bert-d48-l3"}
    assert result["clients"][2]["returncode"] != 0
    for path in tmp_path.rglob("*"):  # the join token travels in the environment, never on disk
        if path.is_file():
            assert sim.token.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=fedprox"], "strategy='fedprox': allowed values are"),
        (["train.lr=-1.0"], "train.lr"),
        (['adapter.gate="tokens"'], "adapter.gate='tokens'"),
        (["data.alpha=0"], "data.alpha"),
        (["server.beta=2.0"], "server.beta"),
        (["train.nosuchkey=1"], "unknown key"),
        (['rounds="five"'], "rounds='five': expected a int"),
    ],
)
def test_bad_config_values_fail_before_anything_starts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


@pytest.mark.parametrize(
    ("strategy", "ranks", "scope"),
    [("fedadapter", (4, 6), "run"), ("fedavg-lora", (2, 4), "family")],
)
def test_ranks_the_strategy_cannot_mix_are_refused_by_name(tmp_path, strategy, ranks, scope):
    groups = ", ".join(f'{{backbone="tiny-bert-d32-l2", rank={r}}}' for r in ranks)
    config = load_config(TINY, [f'strategy="{strategy}"', f"group=[{groups}]"])
    with pytest.raises(ConfigError, match=f"trains one rank per {scope}"):
        run_simulation(config, tmp_path)
    assert not (tmp_path / "server").exists()  # refused before anything started


def test_bad_group_quant_names_allowed_values(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[group]]\nbackbone = "tiny-bert"\nquant = "int3"\n')
    with pytest.raises(ConfigError, match=r"group.quant='int3': allowed values are"):
        load_config(path)


def test_demo_config_loads_and_matches_the_issue():
    from edgetune.sim.cli import DEMO_CONFIG

    config = load_config(DEMO_CONFIG)
    assert isinstance(config, RunConfig) and config.data.dataset == "fortunes"
    assert len(config.data.categories) >= 6 and config.data.alpha == 0.5
    tiers = sorted((g.backbone, g.quant, g.count) for g in config.groups)
    assert tiers == [("minilm-l3", "int8", 2), ("minilm-l6", "nf4", 2), ("minilm-l6", "none", 2)]


def test_readme_config_reference_is_current():
    assert config_reference() in README.read_text(), (
        "regenerate with edgetune.config.config_reference()"
    )


def test_a_used_out_folder_is_refused_unless_overwrite(tmp_path, capsys):
    from edgetune.cli import main

    out = tmp_path / "run"
    args = ["simulate", "--config", str(TINY), "--strategy", "probe", "--out", str(out)]
    assert main(args) == 0
    before = (out / "summary.json").read_text()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a run" in err and "Traceback" not in err
    assert (out / "summary.json").read_text() == before  # the old results are untouched
    assert main([*args, "--overwrite"]) == 0


def test_a_quorum_above_the_client_count_is_refused_before_anything_starts(tmp_path, capsys):
    from edgetune.cli import main

    out = tmp_path / "run"
    args = ["simulate", "--config", str(TINY), "--set", "server.min_clients=4", "--out", str(out)]
    assert main(args) == 2
    assert "server.min_clients=4 exceeds the 3 clients" in capsys.readouterr().err
    assert not out.exists()
