"""The torch side of the export: the adapted task model, traced to an ONNX graph.

`load_adapted` rebuilds a client's task model (fp32 backbone + FedAdapter + head) from its
adapter file. `trace_to_onnx` swaps each FedAdapter layer and the head for stand-ins whose
tensors are graph inputs, then runs the dynamo exporter with dynamic batch and sequence axes.
The fused op `torch.ops.edgetune.fused_adapter` is lowered to plain MatMul/Erf/Add/ReduceSum
by `fused_adapter_onnx` through `custom_translation_table` (never the Triton kernel).
`add_default_initializers` then gives every adapter input an initializer of the same name.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetune import kernels
from edgetune.adapters.fedadapter import apply_fedadapter
from edgetune.config import AdapterConfig
from edgetune.errors import ConfigError
from edgetune.models.zoo import Backbone, load_backbone
from edgetune.onnx.layout import LayerLayout, layer_layouts, read_adapter_file
from edgetune.protocol.names import HEAD_BIAS, HEAD_WEIGHT, META_ADAPTER_CONFIG, QUANT_NONE

if TYPE_CHECKING:
    from pathlib import Path

    import onnx

    from edgetune.adapters.handle import AdapterHandle

OnnxValue = Any  # an onnxscript value while the exporter translates the fused op


def load_adapted(
    backbone: str | Backbone, adapter_path: str | Path
) -> tuple[Backbone, nn.Module, AdapterHandle]:
    """(backbone, task model in eval mode, handle) with the adapter file loaded, fp32."""
    from edgetune.models.heads import build_task_model

    tensors, meta = read_adapter_file(adapter_path)
    if isinstance(backbone, str):
        backbone = load_backbone(backbone)
    else:  # never inject into the caller's model
        backbone = dataclasses.replace(backbone, model=copy.deepcopy(backbone.model))
    if backbone.quant != QUANT_NONE:
        raise ConfigError(f"export needs the fp32 backbone, got quant={backbone.quant!r}")
    config = AdapterConfig.from_json(meta[META_ADAPTER_CONFIG])
    n_classes = int(tensors[HEAD_WEIGHT].shape[0])
    task = build_task_model(backbone, "classify", n_classes)
    handle = apply_fedadapter(task.body, backbone.spec, config, head=task.head)
    handle.load(adapter_path)  # refuses another family, fingerprint or config by name
    return backbone, task.eval(), handle


def wire_arrays(handle: AdapterHandle) -> dict[str, np.ndarray]:
    """The handle's tensors as float32 arrays under their wire names."""
    return {n: t.detach().float().numpy() for n, t in handle.named_tensors().items()}


# -- the traced model ---------------------------------------------------------------------------
class _Feed:
    """The adapter tensors of the forward being traced, shared by all stand-ins.

    A plain object, not a module attribute of tensors: torch.export would flag those.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}


class _ExportAdapter(nn.Module):
    """Stands in for a FedAdapterLayer during export: its tensors are the graph's inputs."""

    def __init__(
        self, layout: LayerLayout, config: AdapterConfig, merged: bool, feed: _Feed
    ) -> None:
        super().__init__()
        self.layout, self.config, self.merged, self.feed = layout, config, merged, feed

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        t, lay = self.feed.tensors, self.layout
        if self.merged:
            hidden = F.gelu(x @ t[lay.merged("D")] + t[lay.merged("b_D")])
            delta = hidden @ t[lay.merged("U")] + t[lay.merged("b_U")]
            return delta if residual is None else residual + delta
        D, b_D = t[lay.name("D")], t[lay.name("b_D")]
        if self.config.gate == "layer":
            alpha = torch.softmax(t[lay.gate], dim=0)
        else:
            alpha = torch.softmax(F.gelu(x @ D + b_D) @ t[lay.gate], dim=-1)
        C = torch.stack([t[n] for n in lay.C])
        q = torch.stack([t[n] for n in lay.q])
        U, b_U = t[lay.name("U")], t[lay.name("b_U")]
        return kernels.fused_adapter(
            x, D, b_D, C, q, alpha, U, b_U, self.config.scale, residual=residual
        )


class _ExportHead(nn.Module):
    def __init__(self, feed: _Feed) -> None:
        super().__init__()
        self.feed = feed

    @property
    def weight(self) -> Tensor:  # the task models read head.weight.dtype
        return self.feed.tensors[HEAD_WEIGHT]

    def forward(self, pooled: Tensor) -> Tensor:
        return F.linear(pooled, self.feed.tensors[HEAD_WEIGHT], self.feed.tensors[HEAD_BIAS])


class _ExportModel(nn.Module):
    """forward(model inputs..., adapter tensors as a list) -> logits."""

    def __init__(self, task: nn.Module, feed: _Feed, names: list[str]) -> None:
        super().__init__()
        self.task, self.feed, self.names = task, feed, names

    def forward(self, inputs: list[Tensor], adapter: list[Tensor]) -> Tensor:
        self.feed.tensors = dict(zip(self.names, adapter, strict=True))
        return self.task(*inputs)


def fused_adapter_onnx(
    x: OnnxValue,
    D: OnnxValue,
    b_D: OnnxValue,
    C: OnnxValue,
    q: OnnxValue,
    alpha: OnnxValue,
    U: OnnxValue,
    b_U: OnnxValue,
    scale: float,
    residual: OnnxValue | None = None,
) -> OnnxValue:
    """ONNX lowering of torch.ops.edgetune.fused_adapter (trace-only onnxscript)."""
    from onnxscript import opset18 as op

    h = op.Add(op.MatMul(x, D), b_D)
    z = op.Mul(op.Mul(h, 0.5), op.Add(op.Erf(op.Mul(h, 0.7071067811865476)), 1.0))  # exact gelu
    zc = op.Add(op.MatMul(op.Unsqueeze(z, [0]), C), op.Unsqueeze(q, [1]))  # [n, T, r]
    if len(alpha.shape) == 1:
        weights = op.Unsqueeze(alpha, [1, 2])  # [n, 1, 1]
    else:
        weights = op.Unsqueeze(op.Transpose(alpha, perm=[1, 0]), [2])  # [n, T, 1]
    u = op.Add(z, op.ReduceSum(op.Mul(zc, weights), [0], keepdims=0))
    delta = op.Mul(op.Add(op.MatMul(u, U), b_U), scale)
    return delta if residual is None else op.Add(residual, delta)


# -- tracing ----------------------------------------------------------------------------------
def _sample_inputs(backbone: Backbone) -> tuple[list[Tensor], list[dict], list[str]]:
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", max=512)
    if backbone.spec.modality == "image":
        size = backbone.preprocess.size
        return [torch.randn(2, 3, size, size)], [{0: batch}], ["pixel_values"]
    ids = torch.randint(1000, 2000, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return [ids, mask], [{0: batch, 1: seq}, {0: batch, 1: seq}], ["input_ids", "attention_mask"]


def trace_to_onnx(
    backbone: Backbone,
    task: nn.Module,
    config: AdapterConfig,
    tensors: dict[str, np.ndarray],
    merged: bool,
    opset: int,
) -> onnx.ModelProto:
    """torch.onnx (dynamo) export with the adapter `tensors` as graph inputs -> ModelProto.

    The task model's adapters and head are swapped for stand-ins during the trace only.
    """
    wrappers = {i: task.body.get_submodule(p) for i, p in enumerate(backbone.spec.ffn_paths)}
    feed = _Feed()
    stand_ins = {
        lay.block: _ExportAdapter(lay, config, merged, feed)
        for lay in layer_layouts(config, backbone.spec.num_layers)
    }
    originals = {b: wrappers[b].adapter for b in stand_ins}
    head, names = task.head, list(tensors)
    sample, dynamic, input_names = _sample_inputs(backbone)
    adapter_args = [torch.from_numpy(tensors[n]) for n in names]
    try:
        for block, stand_in in stand_ins.items():
            wrappers[block].adapter = stand_in
        task.head = _ExportHead(feed)
        model = _ExportModel(task, feed, names).eval()
        return _onnx_export(model, (sample, adapter_args), [*input_names, *names], dynamic, opset)
    finally:
        for block, original in originals.items():
            wrappers[block].adapter = original
        task.head = head


def _onnx_export(
    model: nn.Module, args: tuple, input_names: list[str], dynamic: list[dict], opset: int
) -> onnx.ModelProto:
    n_adapter = len(input_names) - len(dynamic)
    # "torchvision is not installed. Skipping torchvision::nms" and alike, once per process
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # an INFO line per deduplication
    logging.getLogger("onnxscript").setLevel(logging.WARNING)  # an INFO line per folded node
    with warnings.catch_warnings():
        # the batch/seq Dims are shared by both text inputs on purpose; LeafSpec is torch's own
        warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=["logits"],
            dynamic_shapes=(dynamic, [{}] * n_adapter),
            custom_translation_table={torch.ops.edgetune.fused_adapter.default: fused_adapter_onnx},
            optimize=True,
            verbose=False,
            opset_version=opset,
        )
    return program.model_proto


def add_default_initializers(model: onnx.ModelProto, tensors: dict[str, np.ndarray]) -> None:
    """Give each adapter graph input an initializer of the same name: an overridable default."""
    from onnx import numpy_helper

    inputs = {i.name for i in model.graph.input}
    missing = sorted(set(tensors) - inputs)
    if missing:
        raise ConfigError(f"the exported graph lacks the adapter inputs {missing[:5]}")
    for name in tensors:
        model.graph.initializer.append(numpy_helper.from_array(tensors[name], name))
