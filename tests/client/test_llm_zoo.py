"""Small real LLMs in the zoo: GGUF conversion, its cache and checks, tiny decoder configs.

The real-weight tests (SmolLM2-135M, Gemma-3-270M) are `slow`: each converts its GGUF into the
test run's own cache (14-40 s of dequantizing) as a clean machine would.
"""

import json
import math

import pytest
import torch

from edgetune.errors import ZooError
from edgetune.models import gguf
from edgetune.models.zoo import cache_dir, load_backbone

HELD_OUT = [  # plain English the models never saw in this form
    "The committee met on Tuesday to discuss the new budget for the city library.",
    "She opened the window, and a cold wind blew the papers off her desk.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "He said he would call back after lunch, but the phone never rang.",
]


@pytest.mark.parametrize(
    ("name", "model_type", "width", "depth", "style"),
    [("tiny-gemma3-d32-l2", "gemma3_text", 32, 2, "mlp_postnorm"),
     ("tiny-llama-d48-l3", "llama", 48, 3, "mlp")],
)  # fmt: skip
def test_tiny_decoders(name, model_type, width, depth, style):
    backbone = load_backbone(name)
    spec = backbone.spec
    assert (spec.architecture, spec.hidden_size, spec.num_layers) == (model_type, width, depth)
    assert spec.causal_lm and spec.ffn_style == style
    assert spec.ffn_paths == tuple(f"model.layers.{i}.mlp" for i in range(depth))
    assert load_backbone(name).spec.fingerprint == spec.fingerprint  # seeded


def test_bad_gguf_paths_get_one_line(tmp_path):
    with pytest.raises(ZooError, match="no such GGUF file") as missing:
        load_backbone(str(tmp_path / "absent.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ZooError, match="not a GGUF decoder") as bad:
        load_backbone(str(junk))
    for err in (missing, bad):
        assert "\n" not in str(err.value)
    assert not any((tmp_path / "cache").glob("**/*"))


def _meta(model, tokenizer, continuation=None):
    got = gguf.greedy_continuation(model, tokenizer, gguf.VERIFY_PROMPT, gguf.VERIFY_TOKENS)
    return {
        "format": gguf.FORMAT_VERSION,
        "source": "test",
        "prompt": gguf.VERIFY_PROMPT,
        "continuation": got if continuation is None else continuation,
    }


def test_save_verified_is_atomic_and_checked(tmp_path):
    backbone = load_backbone("tiny-llama-d32-l2")
    model, tokenizer = backbone.model, backbone.tokenizer
    with pytest.raises(ZooError, match="delete the folder"):
        gguf.save_verified(model, tokenizer, tmp_path / "bad", _meta(model, tokenizer, "nope"))
    assert list(tmp_path.iterdir()) == []  # no target, no temporary folder left

    target = gguf.save_verified(model, tokenizer, tmp_path / "ok", _meta(model, tokenizer))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]
    assert (target / "model.safetensors").is_file() and (target / gguf.META_FILE).is_file()
    reloaded = load_backbone(str(target))
    assert reloaded.spec.fingerprint == backbone.spec.fingerprint
    gguf.verify((reloaded.model, reloaded.tokenizer), target)  # passes as saved

    with torch.no_grad():  # a damaged cache no longer reproduces its recorded continuation
        reloaded.model.lm_head.weight.mul_(-1.0)
    with pytest.raises(ZooError, match="continues"):
        gguf.verify((reloaded.model, reloaded.tokenizer), target)
    meta = json.loads((target / gguf.META_FILE).read_text())
    (target / gguf.META_FILE).write_text(json.dumps({**meta, "format": 0}))
    with pytest.raises(ZooError, match="cache format"):
        gguf.verify((reloaded.model, reloaded.tokenizer), target)


def held_out_perplexity(model, tokenizer) -> float:
    enc = tokenizer(HELD_OUT, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        return math.exp(float(model(**enc, labels=labels).loss))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_llm_converts_once_and_knows_english(name):
    from transformers import AutoModelForCausalLM

    backbone = load_backbone(name)  # converts into this test run's cache
    folder = cache_dir() / name
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    expect = gguf.SOURCES[name].expect
    got = gguf.greedy_continuation(backbone.model, backbone.tokenizer, gguf.VERIFY_PROMPT, 8)
    assert expect in got
    assert backbone.spec.causal_lm and backbone.spec.family == name
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no leftovers

    ppl = held_out_perplexity(backbone.model, backbone.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_model = AutoModelForCausalLM.from_config(backbone.model.config).eval()
    random_ppl = held_out_perplexity(random_model, backbone.tokenizer)
    assert ppl < 100 and ppl < random_ppl / 100, (ppl, random_ppl)

    again = load_backbone(name)  # from the cache: not converted a second time
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert again.spec.fingerprint == backbone.spec.fingerprint


@pytest.mark.slow
def test_local_gguf_file_is_a_backbone():
    path = gguf.smollm2_gguf()
    backbone = load_backbone(str(path))
    assert backbone.spec.family.startswith("gguf-SmolLM2-135M-Instruct.Q4_1-")
    assert backbone.spec.fingerprint == load_backbone("smollm2-135m").spec.fingerprint
