"""Memory: exact weight bytes per dtype, and the peak memory of a training step.

`weight_bytes` counts the resident bytes of a model per dtype (parameters, buffers and
bitsandbytes quant state, shared storage once); `step_memory` measures the peak resident memory
of one training step in a fresh interpreter, read from the kernel's per-process high-water mark
(`VmHWM`; `ru_maxrss` of a child reports the parent's peak on Linux). For a profiled `Setup`,
`memory_estimate` adds up the exact bytes of a step's resident parts and `peak_step_memory`
measures one warm step in this process (``max_memory_allocated`` on CUDA; on CPU the growth of
``VmHWM``, reset before the step, over the RSS before it).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edgetune.adapters.build import inject
from edgetune.config import AdapterConfig, LoraConfig
from edgetune.errors import ConfigError, ZooError
from edgetune.measure.setup import Setup, device_of, step_closure
from edgetune.models.quant import bnb_module, check_mode
from edgetune.models.weights import weight_bytes
from edgetune.protocol import KIND_FEDADAPTER

if TYPE_CHECKING:
    from edgetune.models.zoo import Backbone


def make_train_step(
    backbone: Backbone,
    adapter: str = "head",
    batch_size: int = 8,
    seq_len: int = 64,
    lr: float = 1e-2,
) -> tuple[Callable[[], float], list[nn.Parameter]]:
    """A closure running one training step on a fixed random batch; returns it and the
    trainable tensors. The loss is cross-entropy of a linear head on mean-pooled outputs.

    adapter="fedadapter": rank-16 FedAdapter in every block + head (QLoRA-style);
    adapter="head": the head alone, with the embedding output requiring grad so that backward
    runs through every (quantized) layer to the input.
    """
    if adapter not in ("head", KIND_FEDADAPTER):
        raise ZooError(f"adapter={adapter!r}: use 'head' or {KIND_FEDADAPTER!r}")
    model, spec = backbone.model, backbone.spec
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch_size, seq_len), generator=gen)
    labels = torch.randint(0, 4, (batch_size,), generator=gen)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    head = nn.Linear(spec.hidden_size, 4)
    trainable = list(head.parameters())
    if adapter == KIND_FEDADAPTER:
        handle = inject(KIND_FEDADAPTER, backbone, None, AdapterConfig(rank=16), LoraConfig())
        trainable += [p for p in handle.named_tensors().values() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    embed = model.get_input_embeddings()

    def step() -> float:
        embeds = embed(ids)
        if adapter == "head":
            embeds = embeds.detach().requires_grad_()
        out = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        loss = nn.functional.cross_entropy(head(pooled), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, trainable


def proc_status_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


def _ru_maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _peak_rss_bytes() -> tuple[int, str]:
    hwm = proc_status_bytes("VmHWM")
    return (hwm, "VmHWM") if hwm is not None else (_ru_maxrss_bytes(), "ru_maxrss")


def _step_memory_child(config_json: str) -> None:
    """Entry point of the measuring interpreter: prints one JSON line."""
    from edgetune.models.zoo import load_backbone

    cfg = json.loads(config_json)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    bnb_module()  # import cost belongs to the baseline of every mode alike
    gc.collect()
    rss_imports = proc_status_bytes("VmRSS")
    backbone = load_backbone(cfg["name"], quant=cfg["quant"])
    gc.collect()
    load_peak, source = _peak_rss_bytes()
    rss_loaded = proc_status_bytes("VmRSS")
    step, trainable = make_train_step(backbone, cfg["adapter"], cfg["batch_size"], cfg["seq_len"])
    step()  # warm-up: optimizer state and lazy kernel initialisation
    reset = reset_peak_rss()
    losses = [step()]
    peak, source = _peak_rss_bytes()
    times = []
    for _ in range(cfg["timed_steps"]):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    result = {
        "quant": backbone.quant,
        "rss_after_imports": rss_imports,
        "load_peak_rss": load_peak,
        "rss_after_load": rss_loaded,
        "step_peak_rss": peak,
        "peak_source": source,
        "peak_reset_before_step": reset,
        "ru_maxrss": _ru_maxrss_bytes(),
        "weight_bytes": weight_bytes(backbone.model),
        "trainable_params": sum(p.numel() for p in trainable),
        "step_seconds": times,
        "losses": losses,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


def step_memory(
    name: str,
    quant: str,
    adapter: str = "head",
    batch_size: int = 8,
    seq_len: int = 64,
    timed_steps: int = 0,
    threads: int | None = None,
    timeout: float = 900.0,
) -> dict:
    """Peak resident memory (bytes) of one training step of backbone `name` at `quant`,
    measured in a fresh interpreter so runs do not pollute each other.

    `step_peak_rss` is the kernel's per-process high-water mark (VmHWM), reset after loading
    and a warm-up step, so it covers one step with the model resident. ru_maxrss is reported
    too but is not used: Linux carries the parent's peak into a child across fork/exec.
    """
    check_mode(quant)
    config = json.dumps(
        {
            "name": name,
            "quant": quant,
            "adapter": adapter,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "timed_steps": timed_steps,
            "threads": threads,
        }
    )
    code = "import sys; from edgetune.measure.memory import _step_memory_child as m; m(sys.argv[1])"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, config],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise ZooError(
            f"step_memory({name!r}, quant={quant!r}) failed in its subprocess "
            f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the memory of a profiled setup --------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    return (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())


def memory_estimate(setup: Setup, features: dict, labels: torch.Tensor) -> dict[str, int]:
    """Exact bytes of a training step's resident parts: weights, the tensors autograd saves for
    backward (activations; each storage once, parameters excluded), gradients and AdamW state.

    ``train_bytes`` is their sum: deterministic, unlike RSS on a shared CPU machine.
    """
    params = {_storage_key(p) for p in setup.task.parameters()}
    buffers = {_storage_key(b) for b in setup.task.buffers()}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in params and key not in buffers and t.device.type != "meta":
            saved[key] = key[1]
        return t

    setup.task.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(setup.task(**features), labels)
    del loss
    setup.task.eval()
    weights = sum(weight_bytes(setup.task).values())
    trainable = sum(p.numel() * p.element_size() for p in setup.trainable)
    out = {"weights": weights, "saved_activations": sum(saved.values())}
    out |= {"gradients": trainable, "adamw_state": 2 * trainable}
    out["train_bytes"] = sum(out.values())
    return out


def peak_step_memory(setup: Setup, features: dict, labels: torch.Tensor) -> dict[str, Any]:
    """Peak memory of one (warm) training step."""
    step = step_closure(setup, features, labels)
    step()  # optimizer state and lazy initialisation are not the step's peak
    device = device_of(setup)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return {
            "peak_bytes": torch.cuda.max_memory_allocated(device),
            "source": "cuda_max_allocated",
        }
    _malloc_trim()
    before = proc_status_bytes("VmRSS")
    if before is None or not reset_peak_rss():
        raise ConfigError("peak memory on CPU needs Linux /proc (VmRSS, clear_refs)")
    step()
    peak = proc_status_bytes("VmHWM") or 0
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
