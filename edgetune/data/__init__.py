"""edgetune.data: data sets and how clients share them.

`datasets` (fortunes, mnist5k, digits, CSV/JSONL files; seeded train/test split), `partition`
(the seeded Dirichlet label-skew partitioner) and `shards` (one client's shard of a run).
"""

from edgetune._lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "datasets": ("DATASETS", "Dataset", "Split", "fortune_categories", "load_dataset"),
        "partition": ("dirichlet_partition", "label_skew", "partition_summary"),
        "shards": ("load_run_dataset", "load_shard"),
    },
)
