"""`edgetune profile`: FLOPs, parameters, bytes on the wire, latency and peak memory of one setup.

    edgetune profile --backbone minilm-l6 --adapter fedadapter --batch 8 --seq 64 [--json]

* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one forward (no grad) and one
  training step (forward + backward; the optimizer step is elementwise and counts zero), the
  fused adapter op included through its registered formula. Counted on the fp32 weights: the
  FLOPs of a step do not depend on the weight format, and bitsandbytes' matmuls have no FLOP
  formula (they would count zero).
* Parameters: trainable (adapter + head; ``full``: every backbone weight + head) and total.
* Bytes per round (``fedadapter`` / ``lora``): ``len()`` of the safetensors bodies that
  ``edgetune.protocol.encode_payload`` produces with the metadata a client sends (upload) and
  the server serves (download), after the chosen compression. ``full`` reports the bytes of
  the same kind of payload holding every trainable tensor (not a protocol kind).
* Latency: median and p90 of forward and of a training step (AdamW) over warm runs; CUDA events
  on CUDA.
* Peak memory: ``max_memory_allocated`` of a step on CUDA; on CPU the growth of the process's
  resident high-water mark (``VmHWM``, reset before the step) over the RSS before it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from edgetune.adapters.fedadapter import apply_fedadapter
from edgetune.adapters.lora import apply_lora
from edgetune.config import AdapterConfig, LoraConfig
from edgetune.errors import ConfigError
from edgetune.measure.flops import flop_counter
from edgetune.models.heads import build_task_model
from edgetune.models.zoo import Backbone, load_backbone
from edgetune.protocol import (
    BUNDLE_GLOBAL,
    COMPRESSION_NONE,
    COMPRESSIONS,
    KIND_FEDADAPTER,
    KIND_LORA,
    META_FAMILY,
    META_KIND,
    META_ROUND,
    META_SPEC,
    PAYLOAD_FAMILY,
    PAYLOAD_GLOBAL,
    AdapterSpec,
    ErrorFeedback,
    UpdateMeta,
    compress_update,
    encode_payload,
    first_block_of,
    initial_tensors,
)

ADAPTERS = ("fedadapter", "lora", "full")
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


@dataclass
class Setup:
    """A task model with its adapter injected, what trains, and the wire spec (None: full)."""

    backbone: Backbone
    task: nn.Module
    trainable: list[nn.Parameter]
    spec: AdapterSpec | None


def build_setup(
    backbone: Backbone,
    adapter: str,
    n_classes: int,
    adapter_config: AdapterConfig,
    lora_config: LoraConfig,
) -> Setup:
    if adapter not in ADAPTERS:
        raise ConfigError(f"adapter={adapter!r}: allowed values are {ADAPTERS}")
    task = build_task_model(backbone, "classify", n_classes=n_classes)
    bspec = backbone.spec
    common = {
        "family": bspec.family,
        "fingerprint": bspec.fingerprint,
        "d_model": bspec.hidden_size,
        "n_layers": bspec.num_layers,
        "n_classes": n_classes,
    }
    if adapter == "full":
        for param in task.parameters():
            param.requires_grad_(True)
        return Setup(backbone, task, [p for p in task.parameters() if p.requires_grad], None)
    if adapter == "lora":
        handle = apply_lora(backbone.model, bspec, lora_config, head=task.head)
        spec = AdapterSpec(
            kind=KIND_LORA, rank=lora_config.rank, lora_modules=handle.module_shapes(), **common
        )
        return Setup(backbone, task, handle.trainable_parameters(), spec)
    handle = apply_fedadapter(backbone.model, bspec, adapter_config, head=task.head)
    spec = None
    first = first_block_of(adapter_config.blocks)
    if first is not None:  # the wire protocol carries adapters on blocks first..L-1
        spec = AdapterSpec(
            kind=KIND_FEDADAPTER,
            rank=adapter_config.rank,
            n_anchors=adapter_config.n_anchors,
            gate=adapter_config.gate,
            first_block=first,
            **common,
        )
    return Setup(backbone, task, handle.trainable_parameters(), spec)


def random_batch(backbone: Backbone, batch: int, seq: int, n_classes: int) -> tuple[dict, Tensor]:
    """A fixed random batch: full-length token ids (or images) and labels."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, n_classes, (batch,), generator=gen)
    if backbone.spec.modality == "image":
        size = backbone.preprocess.size if backbone.preprocess is not None else 224
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=gen)}, labels
    ids = torch.randint(1000, 30000, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}, labels


def count_flops(setup: Setup, features: dict, labels: Tensor) -> dict[str, int]:
    """Exact forward and training-step FLOPs (FlopCounterMode, fused op included)."""
    task = setup.task
    task.eval()
    with torch.no_grad(), flop_counter() as fwd:
        task(**features)
    task.train()
    with flop_counter() as step:
        nn.functional.cross_entropy(task(**features), labels).backward()
    for param in setup.trainable:
        param.grad = None
    task.eval()
    return {"forward": int(fwd.get_total_flops()), "train_step": int(step.get_total_flops())}


def parameter_counts(setup: Setup) -> dict[str, int]:
    ids = {id(p) for p in setup.trainable}
    total = {id(p): p.numel() for p in setup.task.parameters()}
    total.update({id(p): p.numel() for p in setup.trainable})
    return {"trainable": sum(p.numel() for p in setup.trainable), "total": sum(total.values()),
            "frozen": sum(n for i, n in total.items() if i not in ids)}  # fmt: skip


# -- bytes on the wire ---------------------------------------------------------------------------
def update_bytes(
    spec: AdapterSpec,
    tensors: dict[str, Tensor],
    compression: str = COMPRESSION_NONE,
    bundles: tuple[str, ...] | None = None,
    metrics: dict[str, float] | None = None,
    round_id: int = 1,
) -> int:
    """Size of the update body a client PUTs (``ServerClient.upload`` encodes the same)."""
    names = spec.upload_tensors(bundles)
    chosen = {n: t for n, t in tensors.items() if n in names}
    state = ErrorFeedback() if compression != COMPRESSION_NONE else None
    wire, tag = compress_update(chosen, state, compression)
    meta = UpdateMeta(
        family=spec.family,
        round_id=round_id,
        spec_hash=spec.spec_hash,
        fingerprint=spec.fingerprint,
        num_samples=int((metrics or CLIENT_METRICS).get("samples", 1)),
        dtype=spec.dtype,
        compression=tag,
        metrics=dict(CLIENT_METRICS if metrics is None else metrics),
        bundles=bundles,
    )
    return len(encode_payload(wire, meta.to_metadata()))


def download_bytes(spec: AdapterSpec, seed: int = 0, version: int = 1) -> dict[str, int]:
    """Sizes of the global and family models the server serves (its metadata included)."""
    glob, fam = initial_tensors(spec, seed)
    family_meta = {
        META_KIND: PAYLOAD_FAMILY,
        META_ROUND: str(version),
        META_FAMILY: spec.family,
        META_SPEC: spec.to_json(),
    }
    out = {"family": len(encode_payload(fam, family_meta))}
    if glob:
        out["global"] = len(
            encode_payload(glob, {META_KIND: PAYLOAD_GLOBAL, META_ROUND: str(version)})
        )
    return out


def wire_bytes(setup: Setup, compression: str, family_every: int) -> dict[str, Any]:
    """Upload and download bytes per round, per bundle, with ``compression``."""
    if setup.spec is None:
        tensors = {f"full.{i}": p.detach() for i, p in enumerate(setup.trainable)}
        size = len(encode_payload(tensors, {"edgetune.kind": "full"}))
        return {"upload": {"full": size}, "download": {"full": size}, "upload_per_round": size,
                "download_per_round": size, "note": "full fine-tuning: every trainable tensor"}  # fmt: skip
    spec = setup.spec
    glob, fam = initial_tensors(spec, seed=0)
    tensors = {**glob, **fam}
    upload = {"full": update_bytes(spec, tensors, compression)}
    down = download_bytes(spec)
    per_round_up = upload["full"]
    if BUNDLE_GLOBAL in spec.upload_bundles():
        upload["global_only"] = update_bytes(spec, tensors, compression, (BUNDLE_GLOBAL,))
        per_round_up = (upload["full"] + (family_every - 1) * upload["global_only"]) / family_every
    return {
        "upload": upload,
        "download": down,
        "upload_per_round": per_round_up,
        "download_per_round": sum(down.values()),
        "compression": compression,
        "family_every": family_every,
    }


# -- latency and memory --------------------------------------------------------------------------
def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":

        def cuda_time(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return cpu_time


def _stats(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"median_ms": 1e3 * statistics.median(ordered), "p90_ms": 1e3 * p90, "runs": len(times)}


def _device_of(task: nn.Module) -> torch.device:
    return next(task.parameters()).device


def step_closure(setup: Setup, features: dict, labels: Tensor) -> Callable[[], float]:
    optimizer = torch.optim.AdamW(setup.trainable, lr=1e-4)
    task = setup.task

    def step() -> float:
        task.train()
        loss = nn.functional.cross_entropy(task(**features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def measure_latency(setup: Setup, features: dict, labels: Tensor, warmup: int, runs: int) -> dict:
    timer = _timer(_device_of(setup.task))
    step = step_closure(setup, features, labels)

    def forward() -> None:
        setup.task.eval()
        with torch.no_grad():
            setup.task(**features)

    out = {}
    for name, fn in (("forward", forward), ("train_step", step)):
        for _ in range(warmup):
            fn()
        out[name] = _stats([timer(fn) for _ in range(runs)])
    return out


def _storage_key(t: Tensor) -> tuple[int, int]:
    return (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())


def memory_estimate(setup: Setup, features: dict, labels: Tensor) -> dict[str, int]:
    """Exact bytes of a training step's resident parts: weights, the tensors autograd saves for
    backward (activations; each storage once, parameters excluded), gradients and AdamW state.

    ``train_bytes`` is their sum: deterministic, unlike RSS on a shared CPU machine.
    """
    params = {_storage_key(p) for p in setup.task.parameters()}
    buffers = {_storage_key(b) for b in setup.task.buffers()}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in params and key not in buffers and t.device.type != "meta":
            saved[key] = key[1]
        return t

    setup.task.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(setup.task(**features), labels)
    del loss
    setup.task.eval()
    from edgetune.measure.memory import weight_bytes

    weights = sum(weight_bytes(setup.task).values())
    trainable = sum(p.numel() * p.element_size() for p in setup.trainable)
    out = {"weights": weights, "saved_activations": sum(saved.values())}
    out |= {"gradients": trainable, "adamw_state": 2 * trainable}
    out["train_bytes"] = sum(out.values())
    return out


def peak_step_memory(setup: Setup, features: dict, labels: Tensor) -> dict[str, Any]:
    """Peak memory of one (warm) training step."""
    from edgetune.measure.memory import _proc_status_bytes, _reset_peak_rss

    step = step_closure(setup, features, labels)
    step()  # optimizer state and lazy initialisation are not the step's peak
    device = _device_of(setup.task)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return {
            "peak_bytes": torch.cuda.max_memory_allocated(device),
            "source": "cuda_max_allocated",
        }
    _malloc_trim()
    before = _proc_status_bytes("VmRSS")
    if before is None or not _reset_peak_rss():
        raise ConfigError("peak memory on CPU needs Linux /proc (VmRSS, clear_refs)")
    step()
    peak = _proc_status_bytes("VmHWM") or 0
    return {"peak_bytes": max(0, peak - before), "rss_before": before, "source": "VmHWM-VmRSS"}


def _malloc_trim() -> None:
    """Return freed heap pages to the OS so the step's high-water mark starts from live data."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        raise ConfigError("peak memory on CPU needs the C library (malloc_trim)")
    libc = ctypes.CDLL(name)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# -- the profile ---------------------------------------------------------------------------------
def _setup_for(
    name: str, quant: str, adapter: str, n_classes: int, acfg: AdapterConfig, lcfg: LoraConfig,
    device: str,
) -> Setup:  # fmt: skip
    options = {} if quant == "none" else {"quant": quant}
    backbone = load_backbone(name, device=device, **options)
    return build_setup(backbone, adapter, n_classes, acfg, lcfg)


def profile_backbone(
    backbone: str,
    quant: str = "none",
    adapter: str = "fedadapter",
    batch: int = 8,
    seq: int = 64,
    *,
    rank: int = 16,
    blocks: str = "all",
    lora_rank: int = 8,
    lora_targets: tuple[str, ...] = ("query", "value"),
    n_classes: int = 6,
    compression: str = COMPRESSION_NONE,
    family_every: int = 1,
    warmup: int = 2,
    runs: int = 5,
    device: str = "cpu",
    timing: bool = True,
) -> dict[str, Any]:
    """Everything `edgetune profile` reports for one setup, as a JSON-ready dict."""
    if compression not in COMPRESSIONS:
        raise ConfigError(f"compression={compression!r}: allowed values are {COMPRESSIONS}")
    if batch < 1 or seq < 1 or runs < 1 or warmup < 0 or family_every < 1:
        raise ConfigError("batch, seq, runs and family_every must be >= 1, warmup >= 0")
    acfg = AdapterConfig(rank=rank, blocks=blocks)
    lcfg = LoraConfig(rank=lora_rank, targets=tuple(lora_targets))
    fp32 = _setup_for(backbone, "none", adapter, n_classes, acfg, lcfg, device)
    features, labels = random_batch(fp32.backbone, batch, seq, n_classes)
    features = {k: v.to(device) for k, v in features.items()}
    labels = labels.to(device)
    result: dict[str, Any] = {
        "backbone": backbone,
        "family": fp32.backbone.spec.family,
        "quant": quant,
        "adapter": adapter,
        "batch": batch,
        "seq": seq,
        "rank": rank if adapter == "fedadapter" else lora_rank if adapter == "lora" else None,
        "blocks": blocks if adapter == "fedadapter" else None,
        "n_classes": n_classes,
        "device": device,
        "flops": count_flops(fp32, features, labels),
        "params": parameter_counts(fp32),
        "bytes": wire_bytes(fp32, compression, family_every) if fp32.spec or adapter == "full"
        else {"note": "the wire protocol carries adapters on blocks 'all' or 'from:N' only"},
    }  # fmt: skip
    measured = fp32
    if quant != "none":
        measured = _setup_for(backbone, quant, adapter, n_classes, acfg, lcfg, device)
    result["quant_in_use"] = measured.backbone.quant
    result["memory_estimate"] = memory_estimate(measured, features, labels)
    if timing:
        result["latency"] = measure_latency(measured, features, labels, warmup, runs)
        result["memory"] = peak_step_memory(measured, features, labels)
    return result


def format_table(result: dict[str, Any]) -> str:
    """A human-readable table of one profile."""
    gf = result["flops"]
    rows = [
        ("backbone", f"{result['backbone']} ({result['quant']}), adapter={result['adapter']}"),
        ("batch x seq", f"{result['batch']} x {result['seq']}"),
        ("forward GFLOPs", f"{gf['forward'] / 1e9:.4f}"),
        ("train step GFLOPs", f"{gf['train_step'] / 1e9:.4f}"),
        ("trainable / total params", f"{result['params']['trainable']:,} / {result['params']['total']:,}"),
    ]  # fmt: skip
    wire = result["bytes"]
    if "upload" in wire:
        for key, value in wire["upload"].items():
            rows.append((f"upload bytes ({key})", f"{value:,}"))
        for key, value in wire["download"].items():
            rows.append((f"download bytes ({key})", f"{value:,}"))
        rows.append(("upload bytes / round", f"{wire['upload_per_round']:,.0f}"))
    for name, stats in result.get("latency", {}).items():
        rows.append(
            (f"{name} ms (median / p90)", f"{stats['median_ms']:.2f} / {stats['p90_ms']:.2f}")
        )
    est = result["memory_estimate"]
    rows.append(("train memory MB (weights+saved+grads+adamw)", f"{est['train_bytes'] / 1e6:.1f}"))
    if "memory" in result:
        mem = result["memory"]
        rows.append((f"peak step memory MB ({mem['source']})", f"{mem['peak_bytes'] / 1e6:.1f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help="FLOPs, params, bytes, latency, memory of a setup")
    p.add_argument("--backbone", required=True, help="zoo name or model folder")
    p.add_argument("--quant", default="none", choices=("none", "int8", "nf4", "fp4"))
    p.add_argument("--adapter", default="fedadapter", choices=ADAPTERS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=16, help="FedAdapter rank")
    p.add_argument("--blocks", default="all", help="FedAdapter blocks: all or from:N")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--n-classes", type=int, default=6)
    p.add_argument("--compression", default="none", choices=COMPRESSIONS)
    p.add_argument("--family-every", type=int, default=1, help="family bundle every P rounds")
    p.add_argument("--runs", type=int, default=5, help="timed runs after warm-up")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    result = profile_backbone(
        args.backbone, args.quant, args.adapter, args.batch, args.seq, rank=args.rank,
        blocks=args.blocks, lora_rank=args.lora_rank, n_classes=args.n_classes,
        compression=args.compression, family_every=args.family_every, warmup=args.warmup,
        runs=args.runs, device=args.device,
    )  # fmt: skip
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0
