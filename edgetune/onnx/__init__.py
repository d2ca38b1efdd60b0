"""edgetune.onnx: export to ONNX and ONNX Runtime inference (inference needs no torch).

Rooms: `layout` (torch-free facts both sides share: export folder file names, adapter tensor
layouts, the merge fold, the layout id, reading a client's safetensors adapter with numpy),
`infer` (`OnnxClassifier`, adapter files and their checks, `edgetune infer`; torch-free),
`export` (`export_model`, the manifest,
`edgetune export`; loads torch only when an export runs), `trace` (torch: the adapted task model
traced to ONNX, the fused op's lowering), `int4` (4-bit backbone weights) and `cli` (both
subcommands). Names load on first use, so importing this face loads neither torch nor
onnxruntime.
"""

from edgetune._lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "layout": (
            "ADAPTER_FILE",
            "LAYOUTS",
            "MANIFEST_FILE",
            "MODEL_FILE",
            "TOKENIZER_DIR",
            "LayerLayout",
            "graph_tensors",
            "layer_layouts",
            "layout_id",
            "merge_layer",
            "read_adapter_file",
        ),
        "infer": (
            "LoadedAdapter",
            "OnnxClassifier",
            "Prediction",
            "convert_adapter",
            "load_adapter",
            "load_manifest",
            "write_ort_adapter",
        ),
        "export": ("ExportResult", "export_model"),
        "trace": ("load_adapted",),
        "int4": ("quantize_int4",),
        "cli": ("register_cli",),
    },
)
