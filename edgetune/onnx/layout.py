"""What export and inference share, torch-free: file names, adapter layouts, the merge fold.

An export folder holds `MODEL_FILE`, `ADAPTER_FILE`, `MANIFEST_FILE` and `TOKENIZER_DIR`
(see `edgetune.onnx.export`). Its adapter inputs follow one of two `LAYOUTS`:

- ``wire``: the client's tensors under their wire names (`edgetune.protocol.names`);
- ``merged``: per adapted block D, b_D, U', b_U' (`merge_layer`) under `merged_name`, plus the
  head under its wire names.

`read_adapter_file` reads a client's safetensors adapter (`AdapterHandle.save`) with numpy, so
inference can take one without torch; `graph_tensors` turns its wire tensors into a layout's
graph inputs. `layout_id` the 31-bit id an
adapter file must carry to fit an export.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetune.config import AdapterConfig
from edgetune.config.sections import section_json
from edgetune.errors import ConfigError
from edgetune.protocol.names import (
    GATE_LEAF,
    GROUP_FAMILY,
    GROUP_GLOBAL,
    GROUP_PRIVATE,
    HEAD_NAMES,
    HEAD_WEIGHT,
    META_ADAPTER_CONFIG,
    META_FAMILY,
    META_FINGERPRINT,
    family_name,
    global_name,
    lora_factor,
    private_name,
)

MODEL_FILE = "model.onnx"
ADAPTER_FILE = "adapter.onnx_adapter"
MANIFEST_FILE = "edgetune_export.json"
TOKENIZER_DIR = "tokenizer"
LAYOUTS = {"wire": 1, "merged": 2}  # adapter_version of the .onnx_adapter files
#: Group of the merged layout's per-block tensors (graph inputs only, never on the wire).
GROUP_MERGED = "merged"
#: Metadata an adapter file needs to be exported or fed to an export.
REQUIRED_META = (META_FAMILY, META_FINGERPRINT, META_ADAPTER_CONFIG)


def merged_name(block: int, leaf: str) -> str:
    """``merged.layer{l}.{leaf}``: the family name of the same leaf, in the merged group."""
    return GROUP_MERGED + family_name(block, leaf).removeprefix(GROUP_FAMILY)


def branch_name(branch: str, block: int, anchor: int | None, leaf: str) -> str:
    """Wire name of leaf C or q of `branch` at `block` (`anchor`: 1-based global slot or None)."""
    if branch == GROUP_GLOBAL:
        if anchor is None:
            raise ValueError(f"block {block} holds no global slot")
        return global_name(anchor, leaf)
    builders = {GROUP_FAMILY: family_name, GROUP_PRIVATE: private_name}
    if branch not in builders:
        raise ValueError(f"unknown branch {branch!r}")
    return builders[branch](block, leaf)


@dataclass(frozen=True)
class LayerLayout:
    """Wire names of one adapted block's tensors, in the order the fused op stacks them."""

    block: int
    branches: tuple[str, ...]
    C: tuple[str, ...]
    q: tuple[str, ...]
    gate: str  # wire name of alpha_logits or W_alpha

    def name(self, leaf: str) -> str:
        """Wire name of this block's family leaf (D, b_D, U, b_U, ...)."""
        return family_name(self.block, leaf)

    def merged(self, leaf: str) -> str:
        """Graph input name of this block's leaf in the merged layout (D, b_D, U, b_U)."""
        return merged_name(self.block, leaf)


def layer_layouts(config: AdapterConfig, num_layers: int) -> list[LayerLayout]:
    """Per adapted block: branch order and wire names (`edgetune.protocol.names`)."""
    anchors = config.anchor_blocks(num_layers)
    out = []
    for block in config.adapted_blocks(num_layers):
        anchor = anchors.index(block) + 1 if block in anchors else None
        branches = tuple(b for b in config.branches if b != GROUP_GLOBAL or anchor is not None)
        out.append(
            LayerLayout(
                block,
                branches,
                tuple(branch_name(b, block, anchor, "C") for b in branches),
                tuple(branch_name(b, block, anchor, "q") for b in branches),
                family_name(block, GATE_LEAF[config.gate]),
            )
        )
    return out


# -- adapter config JSON ------------------------------------------------------------------------
def layout_id(fingerprint: str, config: AdapterConfig, n_classes: int, layout: str) -> int:
    """31-bit id of what an adapter file must fit: backbone, adapter config, classes, layout."""
    key = f"{fingerprint}|{section_json(config)}|{n_classes}|{layout}"
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


# -- a client's safetensors adapter file ----------------------------------------------------------
def read_adapter_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (as float32) and metadata of a file written by `AdapterHandle.save`, no torch.

    The metadata must name the family, fingerprint and adapter config, and the tensors must
    include the classifier head; each failure raises ConfigError naming the problem.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), "np") as handle:
            meta = handle.metadata() or {}
            names = list(handle.keys())
            bf16 = [n for n in names if handle.get_slice(n).get_dtype() == "BF16"]
            tensors = {n: handle.get_tensor(n) for n in names if n not in bf16}
        tensors.update(_read_bf16(path, bf16))
    except (OSError, SafetensorError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable safetensors adapter file ({err})") from err
    for key in REQUIRED_META:
        if key not in meta:
            raise ConfigError(f"{path}: metadata has no {key!r}; write it with AdapterHandle.save")
    if any(lora_factor(n) for n in tensors):
        raise ConfigError(
            f"{path} is a LoRA adapter: ONNX export takes FedAdapter adapters; a LoRA run's "
            "final/<family>/peft/ folder loads in peft (PeftModel.from_pretrained)"
        )
    if HEAD_WEIGHT not in tensors:
        raise ConfigError(f"{path}: has no {HEAD_WEIGHT}; export needs the classifier head")
    return {n: np.asarray(v, dtype=np.float32) for n, v in tensors.items()}, meta


def _read_bf16(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """BF16 tensors of a safetensors file as float32 (numpy has no bfloat16 to load them as)."""
    if not names:
        return {}
    out = {}
    with path.open("rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
        for name in names:
            begin, end = header[name]["data_offsets"]
            file.seek(8 + size + begin)
            raw = np.frombuffer(file.read(end - begin), dtype="<u2").astype(np.uint32)
            out[name] = (raw << 16).view(np.float32).reshape(header[name]["shape"])
    return out


# -- graph inputs ----------------------------------------------------------------------------------
def merge_layer(
    tensors: dict[str, np.ndarray], layout: LayerLayout, scale: float
) -> dict[str, np.ndarray]:
    """The exact fold of one per-layer-gated block into D, b_D, U', b_U' (fp64 arithmetic)."""
    t = {n: np.asarray(tensors[n], dtype=np.float64) for n in (*layout.C, *layout.q)}
    logits = np.asarray(tensors[layout.gate], dtype=np.float64)
    alpha = np.exp(logits - logits.max())
    alpha /= alpha.sum()
    U = np.asarray(tensors[layout.name("U")], dtype=np.float64)
    M = np.eye(U.shape[0]) + sum(a * t[c] for a, c in zip(alpha, layout.C, strict=True))
    q = sum(a * t[n] for a, n in zip(alpha, layout.q, strict=True))
    b_U = np.asarray(tensors[layout.name("b_U")], dtype=np.float64)
    return {
        layout.merged("D"): np.asarray(tensors[layout.name("D")], np.float32),
        layout.merged("b_D"): np.asarray(tensors[layout.name("b_D")], np.float32),
        layout.merged("U"): (scale * M @ U).astype(np.float32),
        layout.merged("b_U"): (scale * (q @ U + b_U)).astype(np.float32),
    }


def graph_tensors(
    tensors: dict[str, np.ndarray], config: AdapterConfig, num_layers: int, layout: str
) -> dict[str, np.ndarray]:
    """The adapter inputs of a graph of `layout` ("wire" | "merged") from wire tensors."""
    if layout == "wire":
        return {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in tensors.items()}
    if config.gate != "layer":
        raise ConfigError(
            f"merge is exact only for the per-layer gate; this adapter has gate={config.gate!r}"
        )
    out: dict[str, np.ndarray] = {}
    for lay in layer_layouts(config, num_layers):
        out.update(merge_layer(tensors, lay, config.scale))
    out.update({n: np.asarray(tensors[n], dtype=np.float32) for n in HEAD_NAMES})
    return out
