"""`edgetune profile`: FLOPs pinned to hand-computed formulas, bytes to what is actually sent."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest
import torch

from edgetune.config import AdapterConfig, LoraConfig
from edgetune.errors import ConfigError
from edgetune.measure.cli import format_table, register_cli
from edgetune.measure.profile import profile_backbone
from edgetune.measure.setup import build_setup
from edgetune.measure.wire import update_bytes
from edgetune.models.zoo import load_backbone
from edgetune.protocol import initial_tensors


# Hand formulas of the fused adapter (DESIGN section 3), written out here rather than imported
# from the code under test: forward = x@D, one r x r GEMM per branch, u@U; backward = 2x forward
# plus recomputing x@D and z@C_b, less the dx GEMM when x needs no gradient.
def adapter_flops(T: int, d_in: int, r: int, n: int, d_out: int) -> int:
    return 2 * T * (d_in * r + n * r * r + r * d_out)


def adapter_backward_flops(T: int, d_in: int, r: int, n: int, d_out: int, need_dx: bool) -> int:
    return 2 * T * (3 * d_in * r + 3 * n * r * r + 2 * r * d_out) - (
        0 if need_dx else 2 * T * d_in * r
    )


# tiny-bert-d32-l2: width d, FFN width 4d, 2 heads, 2 blocks; batch B x sequence S, C classes.
B, S, D, FF, L, C, R = 2, 8, 32, 128, 2, 3, 4
T = B * S
LINEAR = 2 * T * (4 * D * D + 2 * D * FF)  # Q, K, V, attention output, FFN in + out, per block
BMM = 2 * B * S * S * D  # one attention matmul (scores or probs @ V), all heads, per block
ATTN = 2 * BMM  # forward attention per block
HEAD = 2 * B * D * C


def _profile(adapter: str, **kw) -> dict:
    return profile_backbone(
        "tiny-bert-d32-l2", adapter=adapter, batch=B, seq=S, rank=R, lora_rank=R,
        n_classes=C, timing=False, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def profiles() -> dict[str, dict]:
    return {a: _profile(a) for a in ("fedadapter", "lora", "full")}


def test_forward_flops(profiles) -> None:
    backbone = L * (LINEAR + ATTN) + HEAD
    # both blocks are anchors (K=2 of L=2): 3 branches each
    assert profiles["full"]["flops"]["forward"] == backbone
    assert profiles["fedadapter"]["flops"]["forward"] == backbone + L * adapter_flops(T, D, R, 3, D)
    lora = 2 * T * (D * R + R * D)  # per adapted module (query and value of every block)
    assert profiles["lora"]["flops"]["forward"] == backbone + 2 * L * lora


def test_train_step_flops(profiles) -> None:
    fwd = L * (LINEAR + ATTN) + HEAD
    # full fine-tuning: every linear computes dW and dx (2x its forward), attention backward
    # is 4 matmuls, the head dW and dx
    assert profiles["full"]["flops"]["train_step"] == fwd + 2 * L * LINEAR + L * 2 * ATTN + 2 * HEAD
    # FedAdapter: block 0 backpropagates into its adapter only (no dx: nothing below trains);
    # block 1 into everything (dx only, the backbone is frozen); the head dW and dx
    fed = fwd + L * adapter_flops(T, D, R, 3, D)
    fed += adapter_backward_flops(T, D, R, 3, D, need_dx=False)
    fed += LINEAR + 2 * ATTN + adapter_backward_flops(T, D, R, 3, D, need_dx=True)
    assert profiles["fedadapter"]["flops"]["train_step"] == fed + 2 * HEAD
    # LoRA (query, value): block 0 needs dQ and dV, so its attention (3 of 4 matmuls), output
    # projection and FFN propagate dx; each LoRA module computes dB, dA (+ dx above block 0)
    lora_fwd = fwd + 2 * L * 2 * T * 2 * D * R
    block0 = 3 * BMM + 2 * T * (D * D + 2 * D * FF) + 2 * 3 * 2 * T * D * R
    block1 = LINEAR + 2 * ATTN + 2 * 4 * 2 * T * D * R
    assert profiles["lora"]["flops"]["train_step"] == lora_fwd + block0 + block1 + 2 * HEAD


def test_parameter_counts(profiles) -> None:
    fed, lora, full = (profiles[a]["params"] for a in ("fedadapter", "lora", "full"))
    per_block = D * R + R + R * D + D + 3 * (R * R + R) + 3  # D, b_D, U, b_U, 3 branches, gate
    assert fed["trainable"] == L * per_block + D * C + C
    assert lora["trainable"] == 2 * L * 2 * D * R + D * C + C
    assert full["trainable"] == full["total"]
    assert fed["total"] - fed["trainable"] == full["total"] - D * C - C


def _spec_of(prof: dict):
    return build_setup(load_backbone(prof["backbone"]), "fedadapter", C, AdapterConfig(rank=R),
                       LoraConfig()).spec  # fmt: skip


def test_int8_upload_is_about_a_quarter(profiles) -> None:
    spec = _spec_of(profiles["fedadapter"])
    glob, fam = initial_tensors(spec, seed=0)
    tensors = {**glob, **fam}
    plain, int8 = update_bytes(spec, tensors), update_bytes(spec, tensors, "int8")
    data = sum(t.numel() for t in tensors.values())
    assert int8 < plain and plain - int8 >= 3 * data - 8 * len(tensors) - 4096


def test_timing_memory_table_and_cli(capsys) -> None:
    result = profile_backbone("tiny-bert-d32-l2", adapter="fedadapter", batch=B, seq=S,
                              rank=R, n_classes=C, runs=2, warmup=1)  # fmt: skip
    for name in ("forward", "train_step"):
        stats = result["latency"][name]
        assert 0 < stats["median_ms"] <= stats["p90_ms"] and stats["runs"] == 2
    assert result["memory"]["peak_bytes"] >= 0
    est = result["memory_estimate"]
    assert est["saved_activations"] > 0 and est["train_bytes"] > est["weights"]
    assert "train step GFLOPs" in format_table(result)
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["profile", "--backbone", "tiny-bert-d32-l2", "--adapter", "full",
                              "--batch", "2", "--seq", "8", "--runs", "1", "--json"])  # fmt: skip
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adapter"] == "full" and out["flops"]["train_step"] > 0
    assert torch.get_num_threads() >= 1


def test_adapters_from_block_1_cut_backward_and_travel_on_the_wire() -> None:
    """blocks="from:1" on 3 blocks: backward stops above block 1; the spec names match."""
    prof = profile_backbone("tiny-bert-d32-l3", adapter="fedadapter", batch=B, seq=S, rank=R,
                            blocks="from:1", n_classes=C, timing=False)  # fmt: skip
    fwd = 3 * (LINEAR + ATTN) + HEAD + 2 * adapter_flops(T, D, R, 3, D)
    assert prof["flops"]["forward"] == fwd
    train = fwd + adapter_backward_flops(T, D, R, 3, D, need_dx=False)
    train += LINEAR + 2 * ATTN + adapter_backward_flops(T, D, R, 3, D, need_dx=True) + 2 * HEAD
    assert prof["flops"]["train_step"] == train
    config = AdapterConfig(rank=R, blocks="from:1")
    setup = build_setup(load_backbone("tiny-bert-d32-l3"), "fedadapter", C, config, LoraConfig())
    spec = setup.spec
    assert spec is not None and spec.first_block == 1 and spec.anchor_layers() == [1, 2]
    wire = {**spec.upload_tensors(), **spec.private_tensors()}
    assert not any(".layer0." in n for n in wire)
    numel = sum(math.prod(t.shape) for t in wire.values())
    assert numel == sum(p.numel() for p in setup.trainable)  # same tensors as trained
    assert prof["bytes"]["upload"]["full"] > prof["bytes"]["upload"]["global_only"]


def test_settings_off_the_wire_say_why() -> None:
    """Blocks or branches the wire cannot carry are measured, with the reason they do not
    travel; full fine-tuning is reported as such, not as a protocol payload."""
    prof = profile_backbone("tiny-bert-d32-l3", adapter="fedadapter", batch=B, seq=S, rank=R,
                            blocks=(0, 2), n_classes=C, timing=False)  # fmt: skip
    assert prof["blocks"] == [0, 2] and not prof["on_wire"]
    assert "adapter.blocks" in prof["off_wire"] and prof["bytes"] == {
        "on_wire": False, "note": prof["off_wire"]}  # fmt: skip
    assert prof["flops"]["train_step"] > prof["flops"]["forward"] > 0
    assert "bytes on the wire" in format_table(prof)
    config = AdapterConfig(rank=R, branches=("global", "family"))
    setup = build_setup(load_backbone("tiny-bert-d32-l2"), "fedadapter", C, config, LoraConfig())
    assert setup.spec is None and "adapter.branches" in (setup.off_wire or "")
    full = build_setup(load_backbone("tiny-bert-d32-l2"), "full", C, AdapterConfig(), LoraConfig())
    assert full.spec is None and "full fine-tuning" in (full.off_wire or "")
    with pytest.raises(ConfigError, match="adapter="):
        build_setup(load_backbone("tiny-bert-d32-l2"), "prefix", C, config, LoraConfig())


def test_profile_cli_loads_no_torch() -> None:
    """`edgetune --help` registers the profile subcommand: that must not import torch."""
    code = (
        "import argparse, sys\n"
        "import edgetune.measure, edgetune.measure.cli as c\n"
        "c.register_cli(argparse.ArgumentParser().add_subparsers())\n"
        "sys.exit(3 if 'torch' in sys.modules else 0)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_first_block_keeps_old_spec_hashes() -> None:
    from edgetune.protocol import AdapterSpec, ProtocolError

    spec = AdapterSpec("fam", "fp", d_model=8, n_layers=3, rank=4)
    assert "first_block" not in spec.to_dict()
    later = AdapterSpec("fam", "fp", d_model=8, n_layers=3, rank=4, first_block=1)
    assert AdapterSpec.from_json(later.to_json()) == later and later.spec_hash != spec.spec_hash
    with pytest.raises(ProtocolError):
        AdapterSpec("fam", "fp", d_model=8, n_layers=3, rank=4, first_block=3)
