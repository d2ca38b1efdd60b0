"""Ahead-of-time compilation of exactly the kernels the launchers launch, no GPU needed.

The launchers describe every launch as a `triton_path.Launch` before running it. Here the same
planning functions run on `meta` tensors (shapes, dtypes and 16-byte-aligned pointers, no
memory) and each launch goes through triton's own argument binder and specialisation for an
explicit `GPUTarget`, so the compiled variant is the one the JIT would build on that GPU:
pointers and K/N/R divisible by 16 carry `tt.divisibility`, the flags (SAVE_H, HAS_RES, HAS_H,
TOKEN_ALPHA, WRITE_DX, B_SUMS) are constexprs, T and the split sizes are not specialised
(`do_not_specialize`). ptxas and cuobjdump ship inside the triton wheel, so
`ttir -> ... -> cubin -> cuobjdump --dump-resource-usage` runs on a CPU-only machine and the
table reports registers, stack/local bytes (spills) and shared memory from the binaries.

Must run with TRITON_INTERPRET unset (under the interpreter `@triton.jit` yields interpreted
functions that cannot be lowered), so tests call it in a subprocess:

    python -m edgetune.kernels.aot [--caps 87 89 90] [--ranks 16 32 64 128] [--all-variants]
                                   [--json out.json] [--markdown] [--summary] [--workers 2]

Default variants: those of a training step through the eager autograd path (forward saving
h, with residual; backward from saved h, per-layer alpha, dx needed); --all-variants adds
inference (no h), no residual, the recompute-from-x backward, per-token alpha and no dx.
Shapes: T = 4096, d_in = d_out = 4096 (any d divisible by 16, e.g. 384..8192, gives the same
variant), 3 branches. Per-block shared-memory limits (opt-in maximum, CUDA C++ Programming
Guide, "Technical Specifications per Compute Capability"): sm_87 (Jetson Orin) 163 KB, sm_89
(Ada) 99 KB, sm_90 (Hopper) 227 KB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import product

import torch

SHARED_LIMIT = {87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLAGS = ("SAVE_H", "HAS_RES", "HAS_H", "TOKEN_ALPHA", "WRITE_DX", "B_SUMS")
AOT_T, AOT_D, AOT_BRANCHES = 4096, 4096, 3


@dataclass
class AotResult:
    kernel: str
    variant: str  # the constexpr flags that are set, e.g. "HAS_H+WRITE_DX"
    dtype: str
    r_pad: int
    blocks: str
    num_warps: int
    num_stages: int
    cap: int
    registers: int
    stack: int  # bytes of stack frame: spilled registers live here
    local: int
    shared: int  # dynamic (triton) + static shared memory, bytes
    shared_limit: int


def _variant(meta: dict) -> str:
    return "+".join(f for f in FLAGS if meta.get(f)) or "-"


def plan_launches(dtype: str, r: int, all_variants: bool = False) -> list:
    """The distinct launches of the training step (or of every path) at the AOT shape."""
    from .triton_path import backward_plan, forward_plan

    dt, n = DTYPES[dtype], AOT_BRANCHES
    x = torch.empty(AOT_T, AOT_D, dtype=dt, device="meta")
    f32 = dict(dtype=torch.float32, device="meta")
    shapes = [(AOT_D, r), (r,), (n, r, r), (n, r), (n,), (r, AOT_D), (AOT_D,)]
    params = [torch.empty(s, **f32) for s in shapes]
    token = [*params[:4], torch.empty(AOT_T, n, **f32), *params[5:]]
    h = torch.empty(AOT_T, r, **f32)
    launches = []
    combos = product((True, False), repeat=5) if all_variants else [(True,) * 4 + (False,)]
    for save_h, res, has_h, need_dx, per_token in combos:
        ps = token if per_token else params
        launches += forward_plan(x, *ps, 0.5, x if res else None, save_h)[0]
        plan = backward_plan(x, x, *ps, 0.5, need_dx, h if has_h else None, 528)
        launches += plan.launches
    unique = {}
    for launch in launches:
        unique.setdefault((launch.name, _variant(launch.meta)), launch)
    return list(unique.values())


def _resources(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the one kernel in `cubin`, read by the bundled cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def compile_launch(launch, cap: int):
    """Compile one planned launch for sm_`cap` through the JIT's own binder/specialisation."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, target = launch.kernel, GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **launch.meta)
    options, sig, constexprs, attrs = fn._pack_args(backend, launch.meta, bound, spec, options)
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def compile_one(dtype: str, r: int, cap: int, all_variants: bool = False) -> list[AotResult]:
    """Every planned launch of (dtype, rank) compiled for sm_`cap`, with its resource usage."""
    from . import triton_path as tp

    if tp.INTERPRETED:
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (run in a subprocess)")
    results = []
    for launch in plan_launches(dtype, r, all_variants):
        compiled = compile_launch(launch, cap)
        use = _resources(compiled.asm["cubin"])
        m = launch.meta
        blocks = " ".join(f"{k[6:]}{m[k]}" for k in m if k.startswith("BLOCK"))
        results.append(AotResult(
            launch.name, _variant(m), dtype, m["R_PAD"], blocks, m["num_warps"], m["num_stages"],
            cap, use["REG"], use["STACK"], use["LOCAL"],
            int(compiled.metadata.shared) + use["SHARED"], SHARED_LIMIT[cap],
        ))  # fmt: skip
    return results


def _job(job: tuple[str, int, int, bool]) -> list[AotResult]:
    return compile_one(*job)


def compile_all(
    caps: tuple[int, ...] = (87, 89, 90),
    ranks: tuple[int, ...] = (16, 32, 64, 128),
    dtypes: tuple[str, ...] = tuple(DTYPES),
    all_variants: bool = False,
    workers: int = 1,
) -> list[AotResult]:
    """Every planned launch for every (target, dtype, rank), in `workers` processes."""
    import multiprocessing

    jobs = [(dt, r, cap, all_variants) for cap in caps for dt in dtypes for r in ranks]
    if workers <= 1:
        return [res for j in jobs for res in _job(j)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return [res for part in pool.map(_job, jobs) for res in part]


def markdown_table(results: list[AotResult]) -> str:
    """registers / stack (spill) bytes / shared KB per launch, one column per target."""
    caps = sorted({r.cap for r in results})
    cell = {(r.kernel, r.variant, r.dtype, r.r_pad, r.cap): r for r in results}
    rows = sorted({(r.kernel, r.variant, r.dtype, r.r_pad) for r in results}, key=str)
    head = ["kernel", "flags", "dtype", "R_PAD", "blocks", "warps/stages"]
    head += [f"sm_{c} regs/spill B/shared KB" for c in caps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in rows:
        first = cell[(*key, caps[0])]
        row = [*map(str, key), first.blocks, f"{first.num_warps}/{first.num_stages}"]
        for c in caps:
            x = cell[(*key, c)]
            row.append(f"{x.registers}/{x.stack + x.local}/{x.shared / 1024:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary_table(results: list[AotResult]) -> str:
    """Per kernel and R_PAD, the worst over dtypes and flags: registers / spill B / shared KB."""
    caps = sorted({r.cap for r in results})
    head = ["kernel", "R_PAD", *(f"sm_{c} regs/spill B/shared KB" for c in caps)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kernel, rp in sorted({(r.kernel, r.r_pad) for r in results}):
        row = [kernel, str(rp)]
        for c in caps:
            rs = [r for r in results if (r.kernel, r.r_pad, r.cap) == (kernel, rp, c)]
            regs, spill = max(r.registers for r in rs), max(r.stack + r.local for r in rs)
            row.append(f"{regs}/{spill}/{max(r.shared for r in rs) / 1024:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _meta() -> dict[str, object]:
    """Versions and commit for the JSON record (no GPU is involved in AOT compilation)."""
    import platform

    import triton

    here = os.path.dirname(os.path.abspath(__file__))
    git = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True)
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git.stdout.strip(),
        "shape": {"T": AOT_T, "d": AOT_D, "branches": AOT_BRANCHES},
        "tools": "ptxas and cuobjdump bundled with triton (triton/backends/nvidia/bin)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", type=int, nargs="+", default=[87, 89, 90])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--all-variants", action="store_true", help="every path, not training")
    parser.add_argument("--json", help="write the results as JSON to this file")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--summary", action="store_true", help="worst case per kernel and rank")
    parser.add_argument("--workers", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: AOT compilation lowers real GPU code")
    results = compile_all(
        tuple(args.caps), tuple(args.ranks), tuple(args.dtypes), args.all_variants, args.workers
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": _meta(), "results": [asdict(r) for r in results]}, f, indent=1)
    if args.markdown:
        print(markdown_table(results))
    if args.summary:
        print(summary_table(results))
    for r in results:
        if r.stack or r.local:
            print(f"spills (stack/local bytes): {r}", file=sys.stderr)
    over = [r for r in results if r.shared > r.shared_limit]
    for r in over:
        print(f"over the shared-memory limit: {r}", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
