"""The torch-free vocabulary of `edgetune profile`: what it can measure, what a client reports.

The CLI (`edgetune.measure.profile`) lists these without loading torch; the rooms that measure
(`setup`, `wire`) import them from here.
"""

from __future__ import annotations

from edgetune.protocol.names import KIND_FEDADAPTER, KIND_LORA

#: Full fine-tuning: every backbone weight trains (a reference point, not a protocol kind).
ADAPTER_FULL = "full"
#: What `edgetune profile --adapter` accepts: the two wire kinds and full fine-tuning.
ADAPTERS = (KIND_FEDADAPTER, KIND_LORA, ADAPTER_FULL)

#: The metric keys (with typical values) a client reports in every update's metadata.
CLIENT_METRICS = {
    "samples": 96.0,
    "steps": 12.0,
    "train_loss": 1.2345678901234567,
    "train_seconds": 12.345678901234567,
    "stopped_by_budget": 0.0,
    "train_gflops_est": 123.45678901234567,
    "received_local_acc": 0.5416666666666666,
    "personal_acc": 0.7083333333333334,
}
