"""Ahead-of-time compilation of every kernel configuration the launchers can pick, no GPU needed.

Triton 3.9 compiles an `ASTSource` for an explicit `GPUTarget`; ptxas ships inside the triton
wheel (triton/backends/nvidia/bin/ptxas), so `ttir -> ttgir -> llir -> ptx -> cubin` runs on a
CPU-only machine. This proves the kernels are valid for real GPUs, which the interpreter cannot:
it accepts dot shapes < 16 and other things ptxas/ the MLIR passes reject.

Must run with TRITON_INTERPRET unset (under the interpreter `@triton.jit` yields interpreted
functions that `triton.compile` cannot lower), so tests call it in a subprocess:

    python -m edgetune.kernels.aot [--caps 87 89 90] [--json out.json] [--markdown]

Per-block shared-memory limits (opt-in maximum, CUDA C++ Programming Guide, "Technical
Specifications per Compute Capability"): sm_87 (Jetson Orin) 163 KB, sm_89 (Ada) 99 KB,
sm_90 (Hopper) 227 KB.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import product

import torch

SHARED_LIMIT = {87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class AotResult:
    kernel: str
    dtype: str
    r_pad: int
    block_t: int
    block_k: int
    block_n: int
    num_warps: int
    num_stages: int
    cap: int
    shared: int
    shared_limit: int
    cubin_bytes: int


def _signature(kernel: str, dt: str) -> dict[str, str]:
    """Argument types in kernel order (pointer dtypes follow the activation dtype)."""
    ints = {n: "i32" for n in ("T", "K", "R", "N", "n_branch", "stride_at")} | {"scale": "fp32"}
    if kernel == "fwd":
        names = ("x", "D", "bD", "C", "q", "alpha", "U", "bU", "res", "out")
        return {f"{n}_ptr": f"*{dt}" for n in names} | ints | {"has_res": "i32"}
    act = ("x", "D", "bD", "C", "q", "alpha", "U", "g", "dx")
    part = ("pD", "pbD", "pC", "pq", "pU", "pbU", "dalpha")
    ptrs = {f"{n}_ptr": f"*{dt}" for n in act} | {f"{n}_ptr": "*fp32" for n in part}
    return ptrs | ints | {"need_dx": "i32"}


def launch_configs() -> list[tuple[str, str, int]]:
    """(kernel, dtype, rank bucket) for every configuration the launchers can pick.

    Block sizes, warps and stages are functions of the rank bucket (fwd_config / bwd_config);
    the residual and dx switches are runtime arguments, so they add no compiled variants.
    """
    from .triton_path import RANK_BUCKETS

    return list(product(("fwd", "bwd"), DTYPES, RANK_BUCKETS))


def compile_one(kernel: str, dt: str, r: int, cap: int) -> AotResult:
    """Compile one configuration for sm_`cap` and report its shared memory and cubin size."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import triton_path as fa

    if fa.INTERPRETED:
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (run in a subprocess)")
    cfg = fa.fwd_config(r) if kernel == "fwd" else fa.bwd_config(r)
    fn = fa._fused_adapter_fwd_kernel if kernel == "fwd" else fa._fused_adapter_bwd_kernel
    constexprs = {
        "BLOCK_T": cfg.block_t,
        "BLOCK_K": cfg.block_k,
        "BLOCK_N": cfg.block_n,
        "R_PAD": cfg.r_pad,
        "DOT_DTYPE": fa.dot_dtype(DTYPES[dt]),
    }
    src = triton.compiler.ASTSource(fn, _signature(kernel, dt), constexprs=constexprs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", cap, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    cubin = compiled.asm["cubin"]
    return AotResult(
        kernel,
        dt,
        cfg.r_pad,
        cfg.block_t,
        cfg.block_k,
        cfg.block_n,
        cfg.num_warps,
        cfg.num_stages,
        cap,
        int(compiled.metadata.shared),
        SHARED_LIMIT[cap],
        len(cubin),
    )


def _compile_job(job: tuple[str, str, int, int]) -> AotResult:
    return compile_one(*job)


def compile_all(caps: tuple[int, ...] = (87, 89, 90), workers: int = 1) -> list[AotResult]:
    """Every launcher configuration for every target capability (`workers` processes)."""
    jobs = [(*c, cap) for cap in caps for c in launch_configs()]
    if workers <= 1:
        return [compile_one(*j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_compile_job, jobs))


def markdown_table(results: list[AotResult]) -> str:
    """Shared memory (bytes) per configuration, one column per target, limits in the header."""
    caps = sorted({r.cap for r in results})
    cell = {(r.kernel, r.dtype, r.r_pad, r.cap): r for r in results}
    head = ["kernel", "dtype", "R_PAD", "BLOCK_T/K/N", "warps/stages"]
    head += [f"sm_{c} shared (limit {SHARED_LIMIT[c] // 1024} KB)" for c in caps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kernel, dt, rp in launch_configs():
        any_r = cell[(kernel, dt, rp, caps[0])]
        row = [
            kernel,
            dt,
            str(rp),
            f"{any_r.block_t}/{any_r.block_k}/{any_r.block_n}",
            f"{any_r.num_warps}/{any_r.num_stages}",
        ]
        row += [str(cell[(kernel, dt, rp, c)].shared) for c in caps]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _meta() -> dict[str, object]:
    """Versions and commit for the JSON record (no GPU is involved in AOT compilation)."""
    import platform
    import subprocess

    import triton

    here = os.path.dirname(os.path.abspath(__file__))
    git = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True)
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git.stdout.strip(),
        "ptxas": "bundled with triton (triton/backends/nvidia/bin/ptxas)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", type=int, nargs="+", default=[87, 89, 90])
    parser.add_argument("--json", help="write the results as JSON to this file")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--workers", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: AOT compilation lowers real GPU code")
    results = compile_all(tuple(args.caps), args.workers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": _meta(), "results": [asdict(r) for r in results]}, f, indent=1)
    if args.markdown:
        print(markdown_table(results))
    over = [r for r in results if r.shared > r.shared_limit]
    for r in over:
        print(f"over the shared-memory limit: {r}", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
