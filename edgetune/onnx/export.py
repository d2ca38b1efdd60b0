"""ONNX export of an adapted task model (backbone + FedAdapter + classifier head).

`export_model("minilm-l6", "client.safetensors", "out/")` writes an export folder:

- `model.onnx`: dynamic batch and sequence axes. Every adapter tensor is a graph input that
  also has an initializer (the exported client's values), so it is an *overridable default*:
  the model runs alone, and any other adapter of the same layout is swapped in at run time,
  as feeds or as an ONNX Runtime adapter (`RunOptions.add_active_adapter`), without re-export;
- `adapter.onnx_adapter`: the exported client's adapter in `onnxruntime.AdapterFormat`;
- `edgetune_export.json`: the manifest (family, fingerprint, adapter config, class names, the
  adapter inputs with shapes, the layout id an adapter file must carry) and `tokenizer/`.

The trace lives in `edgetune.onnx.trace` (the fused op is lowered to plain ONNX ops). Options:

- `merge=True`: with the per-layer gate the branches fold into `M = I + sum_b alpha_b C_b` and
  `q' = sum_b alpha_b q_b`; associativity folds M, q' and the scale into the up-projection as
  well: `delta = gelu(x D + b_D) U' + b_U'` with `U' = s M U`, `b_U' = s (q' U + b_U)`, so a
  layer keeps 4 tensors (was 5 + 2 per branch) and one r x r GEMM less per token. The fold is
  done in fp64 (`edgetune.onnx.layout.merge_layer`). The token gate mixes per token, so it
  cannot merge (refused by name).
- `int4=True`: 4-bit backbone weights (`edgetune.onnx.int4`); adapter tensors and head stay fp32.

This module loads torch only when `export_model` runs, so `edgetune export` can register its
subcommand (and `edgetune --help` run) without torch.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgetune.config.sections import section_json
from edgetune.errors import ConfigError
from edgetune.onnx.infer import convert_adapter, write_ort_adapter
from edgetune.onnx.layout import (
    ADAPTER_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    TOKENIZER_DIR,
    graph_tensors,
    layout_id,
    read_adapter_file,
)
from edgetune.protocol.names import HEAD_WEIGHT, META_BACKBONE, META_CLASSES

if TYPE_CHECKING:
    from edgetune.config import AdapterConfig
    from edgetune.models.zoo import Backbone

FP32_OPSET = 18


@dataclass(frozen=True)
class ExportResult:
    """Where `export_model` wrote the export folder, its files and its manifest."""

    out_dir: Path
    model_path: Path
    adapter_path: Path
    manifest: dict


def export_model(
    backbone: str | Backbone,
    adapter_path: str | Path,
    out_dir: str | Path,
    *,
    merge: bool = False,
    int4: bool = False,
    labels: list[str] | None = None,
) -> ExportResult:
    """Export backbone + the adapter file's FedAdapter + head to `out_dir` (see module doc)."""
    import onnx

    from edgetune.onnx.int4 import INT4_OPSET, quantize_int4
    from edgetune.onnx.trace import (
        add_default_initializers,
        load_adapted,
        trace_to_onnx,
        wire_arrays,
    )

    backbone, task, handle = load_adapted(backbone, adapter_path)
    if labels is None:  # the class names the adapter file was trained with, if it has them
        classes = read_adapter_file(adapter_path)[1].get(META_CLASSES)
        labels = json.loads(classes) if classes else None
    layout = "merged" if merge else "wire"
    tensors = graph_tensors(wire_arrays(handle), handle.config, backbone.spec.num_layers, layout)
    manifest = _manifest(backbone, handle.config, tensors, labels, layout, int4)
    opset = INT4_OPSET if int4 else FP32_OPSET
    model = trace_to_onnx(backbone, task, handle.config, tensors, merge, opset)
    add_default_initializers(model, tensors)
    if int4:
        model = quantize_int4(model, set(tensors))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out / MODEL_FILE))
    adapter_file = write_ort_adapter(out / ADAPTER_FILE, tensors, manifest)
    if backbone.tokenizer is not None:
        backbone.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return ExportResult(out, out / MODEL_FILE, adapter_file, manifest)


def _manifest(
    backbone: Backbone,
    config: AdapterConfig,
    tensors: dict[str, np.ndarray],
    labels: list[str] | None,
    layout: str,
    int4: bool,
) -> dict:
    spec, n_classes = backbone.spec, int(tensors[HEAD_WEIGHT].shape[0])
    labels = list(labels) if labels else [f"class{i}" for i in range(n_classes)]
    if len(labels) != n_classes:
        raise ConfigError(f"{len(labels)} labels {labels[:5]} for a head of {n_classes} classes")
    manifest = {
        "format": 1,
        "backbone": spec.name,
        "family": spec.family,
        "fingerprint": spec.fingerprint,
        "modality": spec.modality,
        "num_layers": spec.num_layers,
        "adapter_config": section_json(config),
        "n_classes": n_classes,
        "labels": labels,
        "layout": layout,
        "layout_id": layout_id(spec.fingerprint, config, n_classes, layout),
        "weights": "int4" if int4 else "fp32",
        "adapter_inputs": {n: list(v.shape) for n, v in tensors.items()},
        "model_file": MODEL_FILE,
        "adapter_file": ADAPTER_FILE,
    }
    if spec.modality == "image":
        manifest["preprocess"] = dict(backbone.preprocess.__dict__)
    return manifest


# -- CLI ---------------------------------------------------------------------------------------
def _cmd_export(args: argparse.Namespace) -> int:
    if args.into is not None:
        out = args.into / (Path(args.adapter).stem + ".onnx_adapter")
        print(f"adapter for {args.into}: {convert_adapter(args.adapter, args.into, out)}")
        return 0
    if args.out is None:
        raise ConfigError("export needs --out (or --into DIR to write an adapter only)")
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    _, meta = read_adapter_file(args.adapter)
    backbone = args.backbone or meta.get(META_BACKBONE)
    if not backbone:
        raise ConfigError(f"{args.adapter} does not name its backbone: pass --backbone")
    result = export_model(
        backbone, args.adapter, args.out, merge=args.merge, int4=args.int4, labels=labels
    )
    size = result.model_path.stat().st_size / 2**20
    print(f"model   {result.model_path} ({size:.1f} MiB, {result.manifest['weights']})")
    print(f"adapter {result.adapter_path} (layout {result.manifest['layout']})")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `edgetune export` to the CLI; it runs via `args.func(args)`."""
    p = subparsers.add_parser("export", help="export backbone + FedAdapter + head to ONNX")
    p.add_argument("--backbone", help="zoo name or model folder (default: the adapter file's)")
    p.add_argument("--adapter", type=Path, required=True, help="adapter file (AdapterHandle.save)")
    p.add_argument("--out", type=Path, help="export folder (default: none; needed unless --into)")
    p.add_argument("--merge", action="store_true", help="fold the branches (per-layer gate)")
    p.add_argument("--int4", action="store_true", help="backbone MatMuls as 4-bit MatMulNBits")
    p.add_argument("--labels", help="class names, comma-separated (default: the file's)")
    p.add_argument(
        "--into",
        type=Path,
        help="only write the adapter as .onnx_adapter for this export folder (default: none)",
    )
    p.set_defaults(func=_cmd_export)
