"""EdgeTune: federated fine-tuning of large models on heterogeneous edge devices."""

__version__ = "0.1.0"
