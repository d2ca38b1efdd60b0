"""ONNX Runtime inference on an export folder (see `edgetune.onnx.export`), with swappable adapters.

    clf = OnnxClassifier("out/")                       # the exported client's adapter
    clf.predict(["some text"])                         # -> [Prediction(label, index, probs)]
    clf.predict(["some text"], adapter="b.onnx_adapter")  # another client, same graph

An adapter is an ONNX Runtime adapter file (`.onnx_adapter`, applied with
`RunOptions.add_active_adapter`) or a client's safetensors file from `AdapterHandle.save`
(fed as graph inputs, merged first when the export is merged). Both are checked against the
export's manifest before use: layout, backbone fingerprint / adapter config / classes (through
the layout id), tensor names, shapes, dtypes and finiteness; each failure names the problem.
Inference needs the export folder only: the tokenizer and class names are stored there. This
module loads no torch: it imports `edgetune.onnx.layout` and numpy, and onnxruntime, the
tokenizer and PIL when they are used; `write_ort_adapter` is also the writer the export uses.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetune.config import AdapterConfig
from edgetune.errors import ConfigError
from edgetune.models.preprocess import preprocess_images
from edgetune.onnx.layout import (
    LAYOUTS,
    MANIFEST_FILE,
    TOKENIZER_DIR,
    graph_tensors,
    read_adapter_file,
)
from edgetune.protocol.names import META_ADAPTER_CONFIG, META_FAMILY, META_FINGERPRINT


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probs: dict[str, float] = field(repr=False)


@dataclass
class LoadedAdapter:
    """A validated adapter: an ORT LoraAdapter (from .onnx_adapter) or feeds (safetensors)."""

    path: Path
    lora: object | None = None
    feeds: dict[str, np.ndarray] | None = None


def load_manifest(model_dir: str | Path) -> dict:
    """The manifest of an export folder (`edgetune_export.json`), format checked."""
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"{model_dir} is not an export folder: {MANIFEST_FILE} is missing")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != 1:
        raise ConfigError(f"{path}: unknown export format {manifest.get('format')!r}")
    return manifest


def check_tensors(
    path: Path, tensors: dict[str, tuple[tuple, str, object]], manifest: dict
) -> None:
    """`tensors`: name -> (shape, dtype, values); names, shapes, dtype, finiteness vs manifest."""
    expected = {n: tuple(s) for n, s in manifest["adapter_inputs"].items()}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ConfigError(f"{path}: missing tensors {missing[:5]}, unexpected {extra[:5]}")
    for name, (shape, dtype, values) in tensors.items():
        if tuple(shape) != expected[name]:
            raise ConfigError(
                f"{path}: {name} has shape {tuple(shape)}, this model expects {expected[name]}"
            )
        if dtype not in ("float32", "tensor(float)"):
            raise ConfigError(f"{path}: {name} has dtype {dtype}, this model expects float32")
        if not np.isfinite(values).all():
            raise ConfigError(f"{path}: {name} contains NaN or inf")


def tensors_for_export(adapter_path: str | Path, manifest: dict) -> dict[str, np.ndarray]:
    """A client's safetensors adapter as this export's graph inputs (merged if need be)."""
    path = Path(adapter_path)
    arrays, meta = read_adapter_file(path)
    for key, entry, label in (
        (META_FAMILY, "family", "family"),
        (META_FINGERPRINT, "fingerprint", "backbone fingerprint"),
    ):
        if meta[key] != manifest[entry]:
            raise ConfigError(
                f"{path}: {label} {meta[key]!r} does not match the export's {manifest[entry]!r}"
            )
    if meta[META_ADAPTER_CONFIG] != manifest["adapter_config"]:
        raise ConfigError(
            f"{path}: adapter config {meta[META_ADAPTER_CONFIG]} does not match the "
            f"export's {manifest['adapter_config']}"
        )
    missing = sorted(set(manifest["adapter_inputs"]) - set(arrays))
    if manifest["layout"] == "wire" and missing:
        raise ConfigError(f"{path}: missing tensors {missing[:5]} (saved without some groups?)")
    config = AdapterConfig.from_json(manifest["adapter_config"])
    try:
        out = graph_tensors(arrays, config, manifest["num_layers"], manifest["layout"])
    except KeyError as err:
        raise ConfigError(f"{path}: missing tensor {err} needed to merge the adapter") from err
    check_tensors(path, {n: (v.shape, str(v.dtype), v) for n, v in out.items()}, manifest)
    return out


def write_ort_adapter(path: str | Path, tensors: dict[str, np.ndarray], manifest: dict) -> Path:
    """Write `tensors` as an onnxruntime AdapterFormat file tagged with the export's layout id."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(LAYOUTS[manifest["layout"]])
    fmt.set_model_version(manifest["layout_id"])
    fmt.set_parameters(
        {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for n, v in tensors.items()}
    )
    fmt.export_adapter(str(path))
    return Path(path)


def convert_adapter(adapter_path: str | Path, model_dir: str | Path, out: str | Path) -> Path:
    """Write a client's safetensors adapter as an .onnx_adapter for an existing export."""
    manifest = load_manifest(model_dir)
    return write_ort_adapter(out, tensors_for_export(adapter_path, manifest), manifest)


def read_ort_adapter(path: str | Path, manifest: dict) -> LoadedAdapter:
    """Validate an .onnx_adapter file against the export, then load it as a LoraAdapter."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"adapter file {path} does not exist")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except RuntimeError as err:
        raise ConfigError(f"{path}: corrupt or truncated .onnx_adapter file ({err})") from err
    layout = {v: k for k, v in LAYOUTS.items()}.get(fmt.get_adapter_version(), "unknown")
    if layout != manifest["layout"]:
        raise ConfigError(
            f"{path}: adapter layout {layout!r} (version {fmt.get_adapter_version()}) does not "
            f"match this export's {manifest['layout']!r}; convert with `edgetune export --into`"
        )
    if fmt.get_model_version() != manifest["layout_id"]:
        raise ConfigError(
            f"{path}: made for another backbone or adapter config (layout id "
            f"{fmt.get_model_version()}, this export expects {manifest['layout_id']}: family "
            f"{manifest['family']}, fingerprint {manifest['fingerprint']}, "
            f"{manifest['n_classes']} classes, config {manifest['adapter_config']})"
        )
    params = fmt.get_parameters()
    check_tensors(
        path, {n: (v.shape(), v.data_type(), v.numpy()) for n, v in params.items()}, manifest
    )
    lora = ort.LoraAdapter()
    lora.Load(str(path))
    return LoadedAdapter(path, lora=lora)


def load_adapter(path: str | Path, manifest: dict) -> LoadedAdapter:
    """.onnx_adapter -> LoraAdapter; .safetensors -> graph-input feeds; both validated."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return LoadedAdapter(path, feeds=tensors_for_export(path, manifest))
    return read_ort_adapter(path, manifest)


class OnnxClassifier:
    """ONNX Runtime classifier over an export folder; adapters swap per call."""

    def __init__(self, model_dir: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        self.manifest = load_manifest(self.model_dir)
        self.labels: list[str] = self.manifest["labels"]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # overridable initializers warn once each otherwise
        if threads:
            options.intra_op_num_threads = threads
        model = self.model_dir / self.manifest["model_file"]
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.tokenizer = None
        if self.manifest["modality"] == "text":
            from transformers import AutoTokenizer

            tok_dir = self.model_dir / TOKENIZER_DIR
            self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        self._adapters: dict[Path, LoadedAdapter] = {}

    def adapter(self, path: str | Path) -> LoadedAdapter:
        """Load (once) and validate an adapter file for this export."""
        key = Path(path).resolve()
        if key not in self._adapters:
            self._adapters[key] = load_adapter(key, self.manifest)
        return self._adapters[key]

    def encode(self, inputs: list) -> dict[str, np.ndarray]:
        """Model inputs from texts (tokenized) or images (file paths or arrays)."""
        if not inputs:
            raise ConfigError("nothing to classify: the input list is empty")
        if self.tokenizer is not None:
            batch = self.tokenizer(
                list(inputs), padding=True, truncation=True, max_length=512, return_tensors="np"
            )
            return {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        pre = self.manifest["preprocess"]
        arrays = [_read_image(x) if isinstance(x, (str, Path)) else np.asarray(x) for x in inputs]
        return {"pixel_values": np.concatenate([preprocess_images(a, **pre) for a in arrays])}

    def logits(self, inputs: list, adapter: str | Path | LoadedAdapter | None = None) -> np.ndarray:
        """Logits [N, n_classes]; `adapter` None runs the exported client's adapter."""
        import onnxruntime as ort

        feeds = self.encode(inputs)
        options = ort.RunOptions()
        if adapter is not None:
            loaded = adapter if isinstance(adapter, LoadedAdapter) else self.adapter(adapter)
            if loaded.lora is not None:
                options.add_active_adapter(loaded.lora)
            else:
                feeds.update(loaded.feeds)
        return self.session.run(["logits"], feeds, options)[0]

    def predict(
        self, inputs: list, adapter: str | Path | LoadedAdapter | None = None
    ) -> list[Prediction]:
        """One Prediction (label, index, probabilities by label) per input."""
        logits = self.logits(inputs, adapter).astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return [
            Prediction(self.labels[int(p.argmax())], int(p.argmax()), dict(zip(self.labels, p)))
            for p in probs
        ]


def _read_image(path: str | Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # a writable copy
    except (OSError, UnidentifiedImageError) as err:
        raise ConfigError(f"image {path}: cannot be read ({err})") from err


# -- CLI ---------------------------------------------------------------------------------------
def _cmd_infer(args: argparse.Namespace) -> int:
    inputs = args.text or args.image
    if args.text is not None and not all(t.strip() for t in args.text):
        raise ConfigError("--text is empty: give the text to classify")
    clf = OnnxClassifier(args.model, threads=args.threads)
    modality = clf.manifest["modality"]
    if (args.image is not None) != (modality == "image"):
        given = "--image" if args.image is not None else "--text"
        raise ConfigError(f"{args.model} is a {modality} model: {given} does not apply")
    predictions = clf.predict(inputs, adapter=args.adapter)
    if args.json:
        rows = [
            {"input": str(x), "label": p.label, "probs": p.probs}
            for x, p in zip(inputs, predictions)
        ]
        print(json.dumps(rows, indent=1))
        return 0
    for item, pred in zip(inputs, predictions):
        top = sorted(pred.probs.items(), key=lambda kv: -kv[1])[: args.top]
        shown = ", ".join(f"{label} {p:.3f}" for label, p in top)
        print(f"{pred.label}\t{str(item)[:60]!r}\t[{shown}]")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `edgetune infer` to the CLI; it runs via `args.func(args)`."""
    p = subparsers.add_parser("infer", help="classify with an exported ONNX model")
    p.add_argument("--model", type=Path, required=True, help="export folder (edgetune export)")
    p.add_argument(
        "--adapter",
        type=Path,
        help=".onnx_adapter or .safetensors adapter file (default: the export's own)",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--text", action="append", help="a text to classify (repeatable; default: none)"
    )
    what.add_argument(
        "--image", action="append", type=Path, help="an image file (repeatable; default: none)"
    )
    p.add_argument("--top", type=int, default=3, help="probabilities shown per input")
    p.add_argument(
        "--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's choice)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_infer)
