"""edgetune.models: frozen backbones from the offline zoo, quantization, task heads, converters.

`zoo` (named backbones, local Hugging Face folders, tiny test models; `load_backbone`),
`quant` (bitsandbytes int8/nf4/fp4 on the linear layers, with a probe and fallback), `heads`
(the classifier/LM task model around a backbone), `weights` (exact weight bytes per dtype,
quantized storage included), and the converters `minilm_l3` (ONNX
initializers to a BertModel), `mobilenet` (the CNN class for the MobileNetV2 weights) and
`preprocess` (image preprocessing).
"""

from edgetune._lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "zoo": ("ZOO", "Backbone", "BackboneSpec", "cache_dir", "embed_texts", "load_backbone"),
        "quant": ("apply_quant", "probe_quant", "quantize_model", "resolve_quant"),
        "heads": ("build_task_model",),
        "weights": ("linear_weight_bytes", "memory_table", "weight_bytes"),
        "preprocess": ("ImagePreprocess",),
    },
)
