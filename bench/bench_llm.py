"""LLM training step (issue 14): FedAdapter vs LoRA vs full fine-tuning on SmolLM2 and Gemma-3.

Run:  .venv/bin/python bench/bench_llm.py           (both LLMs; writes bench/results/llm.json)
      .venv/bin/python bench/bench_llm.py --quick   (SmolLM2 only, fewer steps; llm_quick.json)

For each LLM (smollm2-135m, gemma3-270m) and backbone quant (nf4, none = fp32) every variant
trains on the same batch (``--batch`` x ``--seq`` token ids, fixed seed, every position real)
with the `lm` task's own loss (`edgetune.client.lm.lm_loss`: next-token NLL, LM head in
checkpointed chunks) and AdamW:
- ``fedadapter``: the FedAdapter of `edgetune/configs/llm.toml` (its [adapter] section);
- ``lora``: our LoRA module, the one FedAvg-LoRA trains (r=8, alpha=16, the architecture's
  default targets q_proj/v_proj, held equal to PEFT's by tests/adapters);
- ``peft``: PEFT's own `get_peft_model` with the same LoRA settings, as the library reference;
- ``full``: every weight trains (fp32 only: bitsandbytes' 4-bit weights are not trainable, so
  nf4 rows are compared with fp32 full fine-tuning, the thing a device would do otherwise).
Each variant runs in a fresh interpreter, so its peak RSS (kernel ``VmHWM``, reset after a
warm-up step) holds only its own model, gradients and optimizer state. Step time is the median
of the timed steps, as wall time and as the child's CPU time (one torch thread by default, as
simulate's clients have: CPU time is then the work done, which other jobs on a shared machine
inflate far less than wall time); tokens/s counts the batch's real tokens. Repeats interleave
the variants, and every headline is a ratio between variants measured in this run. FLOPs
(FlopCounterMode, fp32 only: bitsandbytes' matmuls have no FLOP formula) and upload bytes per
round (``len()`` of the safetensors body a client PUTs, `edgetune.measure.wire`) are exact.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchinfo import machine_info

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "edgetune" / "configs" / "llm.toml"
LLMS = ("smollm2-135m", "gemma3-270m")
QUANTS = ("none", "nf4")
VARIANTS = ("fedadapter", "lora", "full", "peft")  # run order: the floors' rows first
#: floors from issue 14's acceptance: FedAdapter / reference
FLOORS = {"step_vs_full": 0.75, "step_vs_lora": 1.0, "upload_vs_fedavg_lora": 0.6}
#: FedAdapter communication knobs whose upload bytes per round are reported
KNOBS = [(1, "none"), (2, "none"), (4, "none"), (1, "int8"), (2, "int8"), (4, "int8")]


# -- the measuring child --------------------------------------------------------------------------


def _inject(variant: str, backbone, task) -> tuple[list, Any]:
    """Put ``variant`` on the task model; returns the trainable tensors (and the handle)."""
    from edgetune.adapters.build import inject
    from edgetune.config import load_config

    run = load_config(CONFIG)
    if variant in ("fedadapter", "lora"):
        handle = inject(variant, backbone, None, run.adapter, run.lora)
        return handle.trainable_parameters(), handle
    if variant == "peft":
        import peft

        from edgetune.adapters.lora import resolve_targets

        targets = list(resolve_targets(run.lora, backbone.spec))
        config = peft.LoraConfig(
            r=run.lora.rank, lora_alpha=run.lora.alpha, lora_dropout=0.0, target_modules=targets
        )
        peft.get_peft_model(backbone.model, config)  # swaps LoRA layers into the model in place
        return [p for p in task.parameters() if p.requires_grad], None
    if backbone.quant != "none":
        raise SystemExit(f"full fine-tuning of a {backbone.quant} backbone: weights not trainable")
    for param in task.parameters():
        param.requires_grad_(True)
    return list(task.parameters()), None


def _wire(variant: str, backbone, task, trainable, handle) -> dict[str, Any]:
    """Upload bytes per round (exact): FedAdapter per knob, LoRA / full as they train."""
    from edgetune.adapters.build import wire_spec
    from edgetune.measure.setup import Setup
    from edgetune.measure.wire import wire_bytes

    if variant == "peft":
        return {"note": "same tensors as lora; the library is timed, not sent"}
    spec = None if handle is None else wire_spec(backbone.spec, handle, 0)
    setup = Setup(backbone, variant, task, trainable, spec, None if spec else "full fine-tuning")
    if variant != "fedadapter":
        return {"upload_per_round": wire_bytes(setup, "none", 1)["upload_per_round"]}
    per_knob = {
        f"family_every={every},{comp}": wire_bytes(setup, comp, every)["upload_per_round"]
        for every, comp in KNOBS
    }
    return {"upload_per_round": per_knob["family_every=1,none"], "per_knob": per_knob}


def _flops(task, trainable, features) -> int:
    from edgetune.client.lm import lm_loss
    from edgetune.measure.flops import flop_counter

    task.train()
    with flop_counter() as counter:
        lm_loss(task, features)[0].backward()
    for param in trainable:
        param.grad = None
    return int(counter.get_total_flops())


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Load, inject, warm up, time ``cfg['steps']`` steps; the numbers `main` collects."""
    import torch

    from edgetune.client.lm import lm_loss
    from edgetune.measure.memory import _malloc_trim, proc_status_bytes, reset_peak_rss
    from edgetune.models.heads import build_task_model
    from edgetune.models.quant import bnb_module
    from edgetune.models.weights import weight_bytes
    from edgetune.models.zoo import load_backbone

    torch.set_num_threads(cfg["threads"])
    bnb_module()
    import peft  # noqa: F401  (every variant pays the same imports)

    rss_imports = proc_status_bytes("VmRSS")
    backbone = load_backbone(cfg["llm"], quant=cfg["quant"], strict=True)
    task = build_task_model(backbone, "lm")
    trainable, handle = _inject(cfg["variant"], backbone, task)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(
        100, backbone.model.config.vocab_size, (cfg["batch"], cfg["seq"]), generator=gen
    )
    features = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def step() -> float:
        task.train()
        loss = lm_loss(task, features)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    losses = [step() for _ in range(cfg["warmup"])]
    gc.collect()
    _malloc_trim()
    rss_before = proc_status_bytes("VmRSS")
    reset_peak_rss()
    times, cpu = [], []
    for _ in range(cfg["steps"]):
        start, start_cpu = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    out = {
        "quant_in_use": backbone.quant,
        "rss_after_imports": rss_imports,
        "rss_before_steps": rss_before,
        "step_peak_rss": proc_status_bytes("VmHWM"),
        "weight_bytes": sum(weight_bytes(backbone.model).values()),
        "trainable_params": sum(p.numel() for p in trainable),
        "step_seconds": times,
        "step_cpu_seconds": cpu,
        "losses": losses,
        "tokens_per_step": int(features["attention_mask"].sum()),
        "torch_threads": torch.get_num_threads(),
        "wire": _wire(cfg["variant"], backbone, task, trainable, handle),
    }
    if cfg["quant"] == "none":
        out["train_flops"] = _flops(task, trainable, features)
    return out


# -- the parent -----------------------------------------------------------------------------------


def run_child(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{cfg} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["quant_in_use"] != cfg["quant"]:
        raise RuntimeError(f"{cfg}: ran at quant {result['quant_in_use']}, not {cfg['quant']}")
    return result


def plan(llms: list[str], variants: list[str]) -> list[tuple[str, str, str]]:
    """(llm, quant, variant) in run order; full fine-tuning only on fp32."""
    return [
        (llm, quant, variant)
        for llm in llms
        for quant in QUANTS
        for variant in variants
        if not (variant == "full" and quant != "none")
    ]


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    med = statistics.median
    first = runs[0]
    step = med(t for r in runs for t in r["step_seconds"])
    cpu = med(t for r in runs for t in r["step_cpu_seconds"])
    out = {
        "step_seconds_median": step,
        "step_cpu_seconds_median": cpu,
        "tokens_per_second": first["tokens_per_step"] / step,
        "tokens_per_cpu_second": first["tokens_per_step"] / cpu,
        "step_peak_rss": med(r["step_peak_rss"] for r in runs),
        "step_peak_above_imports": med(r["step_peak_rss"] - r["rss_after_imports"] for r in runs),
        "weight_bytes": first["weight_bytes"],
        "trainable_params": first["trainable_params"],
        "wire": first["wire"],
        "timed_steps": sum(len(r["step_seconds"]) for r in runs),
        "loss_first_last": [first["losses"][0], first["losses"][-1]],
    }
    if "train_flops" in first:
        out["train_flops"] = first["train_flops"]
    return out


def _floor(value: float, floor: float) -> dict[str, Any]:
    return {"ratio": round(value, 4), "floor": floor, "met": value <= floor}


def _step_ratios(fed: dict, refs: dict[str, dict | None], key: str) -> dict[str, Any]:
    floors = {"full_fp32": FLOORS["step_vs_full"], "lora": FLOORS["step_vs_lora"]}
    floors["peft"] = FLOORS["step_vs_lora"]
    return {
        f"vs_{name}": _floor(fed[key] / ref[key], floors[name])
        for name, ref in refs.items()
        if ref is not None
    }


def ratios(rows: dict[str, dict[str, Any]], llm: str) -> dict[str, Any]:
    """FedAdapter against LoRA / PEFT (same quant), full fine-tuning (fp32) and FedAvg-LoRA,
    for the rows measured (a stopped run reports what it has).

    Step ratios come twice: on wall time, and on the child's CPU time (one torch thread, so
    CPU time is the work done, which other jobs on a shared machine inflate far less)."""
    full = rows.get(f"{llm}/none/full")
    out: dict[str, Any] = {}
    for quant in QUANTS:
        fed = rows.get(f"{llm}/{quant}/fedadapter")
        if fed is None:
            continue
        refs = {"full_fp32": full} | {v: rows.get(f"{llm}/{quant}/{v}") for v in ("lora", "peft")}
        out[quant] = {
            "step_wall": _step_ratios(fed, refs, "step_seconds_median"),
            "step_cpu": _step_ratios(fed, refs, "step_cpu_seconds_median"),
        } | {
            f"peak_rss_vs_{name}": fed["step_peak_rss"] / ref["step_peak_rss"]
            for name, ref in refs.items()
            if ref is not None
        }
    fed, lora = rows.get(f"{llm}/none/fedadapter"), rows.get(f"{llm}/none/lora")
    if fed is not None and lora is not None:
        lora_up = lora["wire"]["upload_per_round"]
        out["upload_vs_fedavg_lora"] = {
            knob: _floor(size / lora_up, FLOORS["upload_vs_fedavg_lora"])
            for knob, size in fed["wire"]["per_knob"].items()
        }
        out["flops_vs_lora"] = fed["train_flops"] / lora["train_flops"]
    if fed is not None and full is not None:
        out["flops_vs_full"] = fed["train_flops"] / full["train_flops"]
    return out


def machine() -> dict[str, Any]:
    import peft
    import transformers

    from edgetune.models.quant import bnb_module

    watched = ["edgetune", "kernels", "bench/bench_llm.py"]
    return machine_info(watched) | {
        "transformers": transformers.__version__,
        "bitsandbytes": bnb_module().__version__,
        "peft": peft.__version__,
    }


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smollm2-135m only, 1 warm-up, 3 steps")
    ap.add_argument("--llms", nargs="+", default=list(LLMS), choices=LLMS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved passes over variants")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per child")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per child (simulate's clients use 1)"
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/llm[_quick].json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.llms, args.steps, args.warmup = ["smollm2-135m"], 3, 1
    bad = [k for k in ("repeats", "steps", "warmup", "batch", "seq", "threads")
           if getattr(args, k) < (0 if k == "warmup" else 1)]  # fmt: skip
    if bad:
        ap.error(f"{', '.join(bad)} must be >= 1 (warmup >= 0)")
    name = "llm_quick.json" if args.quick else "llm.json"
    args.out = args.out or ROOT / "bench" / "results" / name
    return args


def write(result: dict[str, Any], runs: dict[str, list[dict]], out: Path, done: bool) -> None:
    """The JSON so far (after every child, so a run stopped on a busy machine keeps its rows)."""
    rows = {key: summarise(r) for key, r in runs.items()}
    result |= {"complete": done, "rows": rows, "runs": runs}
    result["ratios"] = {llm: ratios(rows, llm) for llm in result["config"]["llms"]}
    result["wall_seconds"] = round(time.time() - result["started"], 1)
    result["loadavg_1m_at_end"] = os.getloadavg()[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


def main() -> None:
    args = parse()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    result: dict[str, Any] = {"benchmark": "llm", "machine": machine(), "started": time.time()}
    common = {k: getattr(args, k) for k in ("steps", "warmup", "batch", "seq", "threads")}
    result["config"] = common | {"llms": args.llms, "repeats": args.repeats, "recipe": str(CONFIG)}
    result["config"]["variants"] = args.variants
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for llm, quant, variant in plan(args.llms, args.variants):
            cfg = common | {"llm": llm, "quant": quant, "variant": variant}
            res = run_child(cfg, args.timeout)
            runs.setdefault(f"{llm}/{quant}/{variant}", []).append(res)
            cpu = statistics.median(res["step_cpu_seconds"])
            print(f"repeat {repeat} {llm} {quant} {variant}: step CPU {cpu:.3f} s, "
                  f"peak {res['step_peak_rss'] / 1e6:.0f} MB", flush=True)  # fmt: skip
            write(result, runs, args.out, done=False)
    write(result, runs, args.out, done=True)
    print(json.dumps(result["ratios"], indent=1))
    print(f"wrote {args.out} in {result['wall_seconds']} s")


if __name__ == "__main__":
    main()
