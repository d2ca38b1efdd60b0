"""Reference rows (probe, centralized, homogeneous, isolated) on the tiny run's split."""

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from edgetune.config import load_config
from edgetune.data.shards import load_run_dataset
from edgetune.errors import ConfigError
from edgetune.models.zoo import embed_texts, load_backbone
from edgetune.sim.evaluator import eval_subset
from edgetune.sim.references import run_reference
from edgetune.strategies import STRATEGIES, make_client_hooks

TINY = Path(__file__).parents[1] / "data" / "tiny_sim.toml"
FAMILIES = {"tiny-bert-d32-l2", "tiny-bert-d48-l3"}


def test_probe_is_logistic_regression_on_the_sentence_embeddings(tmp_path):
    """Cross-check: the same probe fit on features from `embed_texts` (another code path to
    the same mean-pooled, L2-normalised embeddings) gives the same accuracy."""
    config = load_config(TINY, ["strategy=probe", "data.eval_samples=20"])
    summary = run_reference(config, tmp_path)
    assert set(summary["final_global_acc"]) == FAMILIES
    assert json.loads((tmp_path / "summary.json").read_text())["reference"] is True
    dataset = load_run_dataset(config.data, config.seed)
    test = eval_subset(config, dataset.test)
    assert len(test) == 20
    backbone = load_backbone("tiny-bert-d48-l3")
    length = config.train.max_length
    train_x = embed_texts(backbone, list(dataset.train.inputs), length).numpy()
    test_x = embed_texts(backbone, list(test.inputs), length).numpy()
    fit = LogisticRegression(C=1.0, max_iter=5000).fit(train_x, dataset.train.labels)
    expected = float((fit.predict(test_x) == np.asarray(test.labels)).mean())
    assert summary["final_global_acc"]["tiny-bert-d48-l3"] == pytest.approx(expected)


def test_centralized_trains_one_client_on_the_whole_split(tmp_path):
    config = load_config(TINY, ["strategy=centralized"])
    summary = run_reference(config, tmp_path)
    assert set(summary["final_global_acc"]) == FAMILIES
    row = summary["per_family"]["tiny-bert-d32-l2"]
    # tiny_sim.toml: 2 rounds of 1 epoch; round 1 gathers statistics (train.head = "stats")
    assert row["epochs"] == 1
    assert all(0.0 <= a <= 1.0 for a in summary["final_global_acc"].values())


@pytest.mark.slow
def test_isolated_families_keep_the_shards_and_seeds_of_the_whole_run(tmp_path):
    config = load_config(TINY, ["strategy=isolated"])
    summary = run_reference(config, tmp_path)
    assert set(summary["final_global_acc"]) == FAMILIES
    # tiny_sim.toml: clients 0-1 are tiny-bert-d32-l2, client 2 is tiny-bert-d48-l3
    for family, expected in (("tiny-bert-d32-l2", [0, 1]), ("tiny-bert-d48-l3", [2])):
        clients = sorted((tmp_path / f"isolated-{family}" / "clients").iterdir())
        configs = [json.loads((c / "config.json").read_text()) for c in clients]
        assert [c["client"]["shard"] for c in configs] == expected
        assert all(c["client"]["shards"] == 3 for c in configs)
        assert [c["train"]["seed"] for c in configs] == expected  # seed * 1000 + shard, seed 0
        assert summary["per_family"][family]["clients"] == len(expected)


@pytest.mark.slow
def test_homogeneous_switches_every_client_to_the_family(tmp_path):
    config = load_config(TINY, ["strategy=homogeneous", "rounds=1"])
    summary = run_reference(config, tmp_path)
    assert set(summary["final_global_acc"]) == FAMILIES
    run = json.loads((tmp_path / "homogeneous-tiny-bert-d48-l3" / "config.json").read_text())
    assert [g["backbone"] for g in run["group"]] == ["tiny-bert-d48-l3"] * 2
    assert (
        run["strategy"] == "fedadapter"
        and summary["per_family"]["tiny-bert-d48-l3"]["clients"] == 3
    )


def test_reference_rows_are_strategies_no_client_runs():
    references = [name for name, entry in STRATEGIES.items() if entry.reference]
    assert references == ["probe", "centralized", "homogeneous", "isolated"]
    with pytest.raises(ConfigError, match="reference row"):
        make_client_hooks("probe")
