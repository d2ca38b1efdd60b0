"""ONNX Runtime vs torch eager: latency of MiniLM-L6 + FedAdapter + head, and export sizes.

Run:  .venv/bin/python bench/bench_onnx.py            (writes bench/results/onnx.json)
      .venv/bin/python bench/bench_onnx.py --quick    (fewer repeats, for a smoke run)

One run builds a rank-16 FedAdapter on MiniLM-L6 (all 6 blocks, 2 anchors, random non-zero
values, 4-class head), exports it three ways (fp32 with the adapter as overridable inputs,
fp32 merged, int4 MatMulNBits + GatherBlockQuantized embeddings) and times forward passes of
batch 1 and 8 at sequence 64: torch eager (no_grad) and the three ONNX Runtime sessions, with
the same intra-op thread count. Repeats interleave the variants (a round times every variant
in turn), each call is timed alone, and the headline is the ratio of medians from this run.
Sizes are the bytes of model.onnx; accuracy is the max |logit difference| to torch (fp32) and
SNR / cosine of int4 logits to fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchinfo import machine_info

from edgetune.adapters.fedadapter import apply_fedadapter
from edgetune.config import AdapterConfig
from edgetune.models.heads import build_task_model
from edgetune.models.zoo import load_backbone
from edgetune.onnx.export import export_model
from edgetune.onnx.infer import OnnxClassifier
from edgetune.onnx.layout import MODEL_FILE
from edgetune.onnx.trace import load_adapted

ROOT = Path(__file__).resolve().parents[1]
MINE = ["edgetune/onnx", "bench/bench_onnx.py"]
VARIANTS = ("torch", "ort_fp32", "ort_merged", "ort_int4")


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).stdout.strip()


def machine() -> dict[str, Any]:
    import onnx
    import onnxruntime
    import transformers

    return machine_info(MINE) | {
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def make_adapter(backbone, path: Path, rank: int) -> None:
    """A trained-looking FedAdapter (random non-zero U, C, q, alpha, head) saved to `path`."""
    own = copy.copy(backbone)
    own.model = copy.deepcopy(backbone.model)
    task = build_task_model(own, "classify", 4)
    handle = apply_fedadapter(task.body, own.spec, AdapterConfig(rank=rank), head=task.head)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in handle.named_tensors().values():
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
    handle.save(path)


def inputs_for(batch: int, seq: int) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(1000, 29000, (batch, seq), generator=gen)
    ids[:, 0] = 101
    return {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, seq), np.int64)}


def runners(task, sessions: dict[str, OnnxClassifier], feeds: dict[str, np.ndarray]):
    ids, mask = (torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))

    def torch_call() -> np.ndarray:
        with torch.no_grad():
            return task(ids, mask).numpy()

    calls = {"torch": torch_call}
    for name, clf in sessions.items():
        calls[name] = lambda clf=clf: clf.session.run(["logits"], feeds)[0]
    return calls


def time_interleaved(calls: dict, repeats: int, iters: int) -> dict[str, list[float]]:
    """Per-call wall times (ms): `repeats` rounds, each running every variant `iters` times."""
    for call in calls.values():  # warm-up: allocations, ORT arena, MKL/oneDNN init
        call()
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            for _ in range(iters):
                start = time.perf_counter()
                call()
                times[name].append(1e3 * (time.perf_counter() - start))
    return times


def accuracy(calls: dict) -> dict[str, float]:
    ref = calls["torch"]()
    fp32 = calls["ort_fp32"]()
    int4 = calls["ort_int4"]().ravel()
    noise = ((int4 - fp32.ravel()) ** 2).sum()
    return {
        "max_abs_diff_ort_fp32_vs_torch": float(np.abs(fp32 - ref).max()),
        "max_abs_diff_ort_merged_vs_torch": float(np.abs(calls["ort_merged"]() - ref).max()),
        "int4_snr_db_vs_fp32": float(10 * np.log10((fp32**2).sum() / noise)),
        "int4_cosine_vs_fp32": float(
            int4 @ fp32.ravel() / np.linalg.norm(int4) / np.linalg.norm(fp32)
        ),
    }


def export_all(backbone, adapter: Path, root: Path) -> dict[str, Path]:
    dirs = {"ort_fp32": root / "fp32", "ort_merged": root / "merged", "ort_int4": root / "int4"}
    export_model(backbone, adapter, dirs["ort_fp32"])
    export_model(backbone, adapter, dirs["ort_merged"], merge=True)
    export_model(backbone, adapter, dirs["ort_int4"], int4=True)
    return dirs


def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    backbone = load_backbone("minilm-l6")
    adapter = root / "adapter.safetensors"
    make_adapter(backbone, adapter, args.rank)
    dirs = export_all(backbone, adapter, root)
    sizes = {n: (d / MODEL_FILE).stat().st_size for n, d in dirs.items()}
    _, task, _ = load_adapted(backbone, adapter)
    sessions = {n: OnnxClassifier(d, threads=args.threads) for n, d in dirs.items()}
    result: dict[str, Any] = {"model_bytes": sizes, "latency_ms": {}, "ratios": {}}
    result["model_bytes_ratio_int4_to_fp32"] = sizes["ort_int4"] / sizes["ort_fp32"]
    for batch in args.batches:
        calls = runners(task, sessions, inputs_for(batch, args.seq))
        times = time_interleaved(calls, args.repeats, args.iters)
        medians = {n: statistics.median(t) for n, t in times.items()}
        key = f"batch{batch}_seq{args.seq}"
        result["latency_ms"][key] = {
            n: {"median": medians[n], "min": min(t), "n": len(t)} for n, t in times.items()
        }
        result["ratios"][key] = {f"torch_over_{n}": medians["torch"] / medians[n] for n in sessions}
        result.setdefault("accuracy", {})[key] = accuracy(calls)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 repeats x 5 calls")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "onnx.json")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.iters = 2, 5
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result: dict[str, Any] = {"benchmark": "onnx", "machine": machine(), "started": time.time()}
    result["config"] = {
        "backbone": "minilm-l6",
        "adapter": f"fedadapter rank {args.rank}, all blocks, 2 anchors, 4-class head",
        **{k: v for k, v in vars(args).items() if k != "out"},
    }
    with tempfile.TemporaryDirectory(prefix="edgetune-bench-onnx-") as tmp:
        result.update(bench(args, Path(tmp)))
    result["loadavg_1m_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ratios", "model_bytes", "accuracy")}, indent=2))


if __name__ == "__main__":
    main()
