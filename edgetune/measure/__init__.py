"""edgetune.measure: what a setup costs, measured or counted exactly.

Rooms: `flops` (FlopCounterMode with the formulas torch lacks; a setup's forward and step
FLOPs), `profile` (`profile_backbone`: everything ``edgetune profile`` reports), `memory`
(peak memory of a training step; exact weight bytes are `edgetune.models.weights`), `wire` (bytes of the safetensors
bodies a client sends and receives per round), `setup` (the task model with its adapter and
wire spec that a profile measures), `latency` (timed forward and step), `names` (the
torch-free vocabulary: adapter choices, the metrics a client reports) and `cli` (the
``edgetune profile`` command, torch-free to register). Names load on first use, so importing
this face loads no torch.
"""

from edgetune._lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "names": ("ADAPTERS", "ADAPTER_FULL", "CLIENT_METRICS"),
        "flops": ("count_flops", "flop_counter"),
        "setup": (
            "Setup",
            "build_setup",
            "load_setup",
            "parameter_counts",
            "random_batch",
            "step_closure",
        ),
        "wire": ("download_bytes", "full_bytes", "update_bytes", "wire_bytes"),
        "latency": ("measure_latency",),
        "memory": (
            "make_train_step",
            "memory_estimate",
            "peak_step_memory",
            "proc_status_bytes",
            "reset_peak_rss",
            "step_memory",
        ),
        "profile": ("profile_backbone",),
        "cli": ("format_table", "register_cli", "run_cli"),
    },
)
