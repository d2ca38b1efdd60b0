"""Datasets and the Dirichlet partitioner."""

import json

import numpy as np
import pytest

from edgetune.data.datasets import load_dataset, load_fortunes
from edgetune.data.partition import dirichlet_partition, label_skew, partition_summary
from edgetune.errors import DataError


def test_fortunes_is_deduplicated_and_split_deterministically():
    first = load_fortunes(("computers", "food", "law"), seed=3)
    second = load_fortunes(("computers", "food", "law"), seed=3)
    assert first.train.inputs == second.train.inputs and first.test.inputs == second.test.inputs
    texts = first.train.inputs + first.test.inputs
    assert len(texts) == len(set(texts))
    assert not set(first.train.inputs) & set(first.test.inputs)
    assert first.classes == ["computers", "food", "law"]
    assert set(np.unique(first.test.labels)) == {0, 1, 2}  # stratified: every class in test
    other = load_fortunes(("computers", "food", "law"), seed=4)
    assert other.test.inputs != first.test.inputs


def test_fortunes_rejects_unknown_category():
    with pytest.raises(DataError, match="unknown"):
        load_fortunes(("computers", "no-such-category"))


def test_fortunes_cap_per_class():
    data = load_fortunes(("computers", "politics"), max_per_class=50)
    assert len(data.train) + len(data.test) == 100


@pytest.mark.parametrize(
    ("name", "total", "shape"), [("digits", 1797, (8, 8)), ("mnist5k", 5000, (28, 28))]
)
def test_image_datasets(name, total, shape):
    data = load_dataset(name)
    assert len(data.train) + len(data.test) == total
    assert data.train.inputs.shape[1:] == shape and data.modality == "image"
    assert len(data.classes) == 10


def test_csv_and_jsonl(tmp_path):
    rows = [("good film", "pos"), ("bad film", "neg"), ("great", "pos"), ("awful", "neg")] * 3
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text("text,label\n" + "\n".join(f"{t},{lab}" for t, lab in rows))
    jsonl_path = tmp_path / "reviews.jsonl"
    jsonl_path.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in rows))
    for path in (csv_path, jsonl_path):
        data = load_dataset(str(path))
        assert data.classes == ["neg", "pos"] and len(data.train) + len(data.test) == 12


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("text,label\nonly one,a\nanother,a\n", ".csv", "at least 2 labels"),
        ('{"text": "x"}\n', ".jsonl", "lacks a non-empty"),
        ("{not json\n", ".jsonl", "not valid JSON"),
    ],
)
def test_malformed_files(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(str(path))


def _labels(n_classes=5, per_class=200):
    return np.repeat(np.arange(n_classes), per_class)


@pytest.mark.parametrize(("clients", "alpha"), [(1, 0.5), (6, 0.5), (13, 0.05), (40, 0.01)])
def test_partition_covers_every_sample_once_and_no_client_is_empty(clients, alpha):
    labels = _labels()
    parts = dirichlet_partition(labels, clients, alpha, seed=7)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and set(joined.tolist()) == set(range(len(labels)))
    assert min(len(p) for p in parts) >= 1


def test_partition_is_deterministic_for_a_seed():
    labels = _labels()
    a = dirichlet_partition(labels, 6, 0.5, seed=11)
    b = dirichlet_partition(labels, 6, 0.5, seed=11)
    c = dirichlet_partition(labels, 6, 0.5, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_skew_grows_as_alpha_falls():
    labels = _labels()
    skews = [
        np.mean(
            [label_skew(labels, dirichlet_partition(labels, 8, alpha, seed=s)) for s in range(5)]
        )
        for alpha in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


@pytest.mark.parametrize(
    ("clients", "alpha", "message"),
    [
        (0, 1.0, "num_clients"),
        (3, 0.0, "alpha"),
        (3, float("nan"), "alpha"),
        (2000, 1.0, "cannot give"),
    ],
)
def test_partition_bad_arguments(clients, alpha, message):
    with pytest.raises(DataError, match=message):
        dirichlet_partition(_labels(), clients, alpha)


def test_partition_summary_counts():
    labels = np.array([0, 0, 1, 1, 1, 2])
    table = partition_summary(labels, [np.array([0, 2]), np.array([1, 3, 4, 5])], ["a", "b", "c"])
    lines = table.splitlines()
    assert lines[1].split() == ["0", "1", "1", "0", "2"]
    assert lines[2].split() == ["1", "1", "2", "1", "4"]
