"""Quantized backbones: weight bytes, peak RSS and time of a FedAdapter training step.

Run:  .venv/bin/python bench/bench_quant.py             (writes bench/results/quant.json)
      .venv/bin/python bench/bench_quant.py --quick     (1 repeat, 3 timed steps)

For MiniLM-L6 at each quant mode (none, int8, nf4) this measures, in one run:
- weight bytes, exact (edgetune.measure.memory.weight_bytes: parameters, buffers, packed 4-bit storage
  and quant state), over the whole backbone and over the quantized linear layers only: the
  embeddings (30522 x 384 fp32 = 47 MB of MiniLM's 90 MB) stay full precision by design;
- peak resident memory of one training step (rank-16 FedAdapter in every block + a 4-class
  head, AdamW, batch x seq tokens), each in a fresh interpreter (edgetune.measure.memory.step_memory):
  the kernel's high-water mark VmHWM, reset after loading and one warm-up step. Also reported:
  the same peak minus the RSS after importing torch/transformers/bitsandbytes (what the model
  and the step add), and the load peak (quantized modes load fp32 first);
- step time, median over the timed steps of every repeat.
Repeats interleave the modes, and every headline is a ratio to `none` from this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchinfo import machine_info

from edgetune.measure import memory as quant_memory
from edgetune.models import quant
from edgetune.models import weights as model_weights
from edgetune.models.zoo import load_backbone

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"nf4_weight_bytes_ratio": 0.35, "nf4_step_peak_rss_ratio": 0.6}


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).stdout.strip()


def machine() -> dict[str, Any]:
    import transformers

    bitsandbytes = quant.bnb_module()  # mutes its import-time advice to install `kernels`
    mine = ["edgetune/models", "edgetune/measure/memory.py", "bench/bench_quant.py"]
    return machine_info(mine) | {
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }


def weights(name: str, mode: str) -> dict[str, Any]:
    backbone = load_backbone(name, quant=mode, strict=True)
    per_dtype = model_weights.weight_bytes(backbone.model)
    linear = model_weights.linear_weight_bytes(backbone.model)
    return {
        "bytes_by_dtype": per_dtype,
        "total_bytes": sum(per_dtype.values()),
        "linear_bytes_by_dtype": linear,
        "linear_bytes": sum(linear.values()),
        "quantized_layers": len(backbone.extras.get("quant", {}).get("layers", [])),
    }


def steps(name: str, quants: list[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {mode: [] for mode in quants}
    for repeat in range(args.repeats):
        for mode in quants:
            result = quant_memory.step_memory(
                name,
                mode,
                adapter="fedadapter",
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                timed_steps=args.steps,
                threads=args.threads,
            )
            if result["quant"] != mode:
                raise RuntimeError(f"{mode} fell back to {result['quant']} in the child")
            runs[mode].append(result)
            peak = result["step_peak_rss"] / 1e6
            print(f"repeat {repeat} {mode}: step peak {peak:.1f} MB", flush=True)
    return runs


def summarise(runs: list[dict]) -> dict[str, Any]:
    med = statistics.median
    return {
        "step_peak_rss": med(r["step_peak_rss"] for r in runs),
        "step_peak_above_imports": med(r["step_peak_rss"] - r["rss_after_imports"] for r in runs),
        "rss_after_imports": med(r["rss_after_imports"] for r in runs),
        "rss_after_load": med(r["rss_after_load"] for r in runs),
        "load_peak_rss": med(r["load_peak_rss"] for r in runs),
        "step_seconds_median": med(t for r in runs for t in r["step_seconds"]),
        "trainable_params": runs[0]["trainable_params"],
        "loss_first_last": [runs[0]["losses"][0], runs[0]["losses"][-1]],
        "peak_source": runs[0]["peak_source"],
        "repeats": len(runs),
    }


def ratios(result: dict[str, Any], quants: list[str]) -> dict[str, dict[str, float]]:
    base_w, base_s = result["weights"]["none"], result["step"]["none"]
    out = {}
    for mode in quants:
        w, s = result["weights"][mode], result["step"][mode]
        out[mode] = {
            "weight_bytes": w["total_bytes"] / base_w["total_bytes"],
            "linear_weight_bytes": w["linear_bytes"] / base_w["linear_bytes"],
            "step_peak_rss": s["step_peak_rss"] / base_s["step_peak_rss"],
            "step_peak_above_imports": s["step_peak_above_imports"]
            / base_s["step_peak_above_imports"],
            "load_peak_rss": s["load_peak_rss"] / base_s["load_peak_rss"],
            "step_time": s["step_seconds_median"] / base_s["step_seconds_median"],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--name", default="minilm-l6")
    ap.add_argument("--quick", action="store_true", help="1 repeat, 3 timed steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quant.json")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 3
    quants = ["none", "int8", "nf4"]
    result: dict[str, Any] = {"benchmark": "quant", "machine": machine(), "started": time.time()}
    result["config"] = {"name": args.name, "quants": quants, "adapter": "fedadapter rank 16"}
    result["config"] |= {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    result["weights"] = {mode: weights(args.name, mode) for mode in quants}
    runs = steps(args.name, quants, args)
    result["step"] = {mode: summarise(runs[mode]) for mode in quants}
    result["runs"] = runs
    result["ratios_to_none"] = ratios(result, quants)
    nf4 = result["ratios_to_none"]["nf4"]
    result["headline"] = {
        "nf4_weight_bytes_ratio": nf4["weight_bytes"],
        "nf4_linear_weight_bytes_ratio": nf4["linear_weight_bytes"],
        "nf4_step_peak_rss_ratio": nf4["step_peak_rss"],
        "nf4_step_peak_above_imports_ratio": nf4["step_peak_above_imports"],
        "nf4_step_time_ratio": nf4["step_time"],
        "targets": TARGETS,
        "met": {k: nf4_value <= v for k, v in TARGETS.items() for nf4_value in [_pick(nf4, k)]},
    }
    result["loadavg_1m_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result["ratios_to_none"], indent=2))
    print(json.dumps(result["headline"], indent=2))


def _pick(ratios_nf4: dict[str, float], target: str) -> float:
    key = target.removeprefix("nf4_").removesuffix("_ratio")
    return ratios_nf4[key]


if __name__ == "__main__":
    sys.exit(main())
