"""The `lm` task on tiny random decoders: masked, chunked loss; training; classification
without the LM head; config; a two-family simulate run that reports perplexity and samples."""

import json
import math
from pathlib import Path

import pytest
import torch

from edgetune.adapters import inject
from edgetune.client.lm import greedy_samples, token_stats
from edgetune.client.trainer import EncodedSplit, evaluate, train_local
from edgetune.config import AdapterConfig, LoraConfig, TrainConfig, load_config
from edgetune.data.datasets import Split
from edgetune.errors import ConfigError
from edgetune.models.heads import build_task_model
from edgetune.models.zoo import load_backbone
from edgetune.sim.harness import run_simulation
from tests.client.test_simulate import TINY

TEXTS = [
    "the cat sat on the mat and looked at the dog",
    "a short one",
    "compilers turn source code into machine code, one pass at a time",
]


def _encoded(backbone, texts, max_length=32):
    return EncodedSplit(backbone, Split(list(texts), [0] * len(texts)), max_length)


def _features(backbone, texts):
    return _encoded(backbone, texts).batch(torch.arange(len(texts)))[0]


@pytest.mark.parametrize("name", ["tiny-llama-d32-l2", "tiny-gemma3-d32-l2"])
def test_loss_counts_real_tokens_only_and_chunks_exactly(name):
    backbone = load_backbone(name)
    task = build_task_model(backbone, "lm")
    batch = _features(backbone, TEXTS)
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    with torch.no_grad():
        nll, n, _ = token_stats(task, batch, chunk=5)
        alone = [token_stats(task, _features(backbone, [t])) for t in TEXTS]
        # each text alone, against Hugging Face's own shifted mean loss (no padding there)
        for text, (one_nll, one_n, _) in zip(TEXTS, alone):
            enc = _features(backbone, [text])
            ref = backbone.model(**enc, labels=enc["input_ids"]).loss
            assert float(one_nll) / one_n == pytest.approx(float(ref), rel=1e-5)
    assert n == int(batch["attention_mask"].sum()) - len(TEXTS)
    assert n == sum(a[1] for a in alone)
    assert float(nll) == pytest.approx(sum(float(a[0]) for a in alone), rel=1e-5)


def test_training_lowers_the_loss_and_moves_only_the_adapter():
    backbone = load_backbone("tiny-llama-d32-l2")
    task = build_task_model(backbone, "lm")
    handle = inject("fedadapter", backbone, task.head, AdapterConfig(rank=4, n_anchors=1),
                    LoraConfig(), 0)  # fmt: skip
    frozen = {n: p.detach().clone() for n, p in backbone.model.named_parameters()
              if not p.requires_grad}  # fmt: skip
    data = _encoded(backbone, TEXTS * 4)
    before = evaluate(task, data)
    config = TrainConfig(epochs=8, batch_size=4, lr=1e-2, loss="ce")
    result = train_local(task, handle.trainable_parameters(), data, config)
    after = evaluate(task, data)
    assert result.steps == 8 * 3 and result.samples == 8 * 12
    # a random tiny decoder's normed states and 0.02-scale head cap how far logits can move
    # (about 0.6 nats here): the loss falls by half of that and tokens start being predicted
    assert after.loss < before.loss - 0.25, (before.loss, after.loss)
    assert after.accuracy > before.accuracy + 0.1
    for name, param in backbone.model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    samples = greedy_samples(task, backbone.tokenizer, ("the cat",), tokens=4)
    assert samples[0]["prompt"] == "the cat" and samples[0]["continuation"]


def test_gemma3_delta_joins_after_the_post_ffn_norm():
    """Gemma-3 normalises the MLP output before the residual add; the adapter's delta joins
    after that norm (as in Llama), not inside it where the norm's gain would scale it, and
    removal restores the block."""
    backbone = load_backbone("tiny-gemma3-d32-l2")
    block = backbone.model.model.layers[1]
    mlp, norm = block.mlp, block.post_feedforward_layernorm
    batch = _features(backbone, TEXTS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)  # a norm with a real gain
        before = backbone.model(**batch).logits
    handle = inject("fedadapter", backbone, None, AdapterConfig(rank=4, n_anchors=1),
                    LoraConfig(), 0)  # fmt: skip
    layer, x = handle.layers[1], torch.randn(2, 5, 32, generator=gen)
    with torch.no_grad():
        assert torch.allclose(backbone.model(**batch).logits, before, atol=1e-5)  # U = 0
        layer.U.normal_(generator=gen)
        delta = layer(x)
        assert float(delta.abs().max()) > 0.1
        assert isinstance(block.post_feedforward_layernorm, torch.nn.Identity)
        assert torch.allclose(block.mlp(x), norm(mlp(x)) + delta, atol=1e-5)
    handle.remove()
    assert block.mlp is mlp and block.post_feedforward_layernorm is norm
    with torch.no_grad():
        assert torch.allclose(backbone.model(**batch).logits, before, atol=1e-6)


def test_classify_on_a_decoder_never_runs_the_lm_head():
    backbone = load_backbone("tiny-gemma3-d32-l2")
    calls = []
    backbone.model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    task = build_task_model(backbone, "classify", n_classes=3)
    batch = _features(backbone, TEXTS)
    with torch.no_grad():
        logits = task(**batch)
        full = backbone.model(**batch, output_hidden_states=True).hidden_states[-1]
    assert logits.shape == (3, 3) and len(calls) == 1  # only the reference call above
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (full * mask).sum(1) / mask.sum(1)
    assert torch.allclose(task.head(pooled), logits, atol=1e-5)


def test_task_key_is_checked():
    assert load_config(TINY, ["task=lm"]).task == "lm"
    with pytest.raises(ConfigError, match=r"task='regress'.*allowed values"):
        load_config(TINY, ["task=regress"])
    with pytest.raises(ConfigError, match="needs a decoder"):
        build_task_model(load_backbone("tiny-bert-d32-l2"), "lm")


def test_lm_run_reports_perplexity_per_family_and_samples(tmp_path):
    config = load_config(TINY, ["task=lm", "train.lr=0.01", "train.epochs=2"])
    groups = ["tiny-llama-d32-l2", "tiny-gemma3-d48-l2"]
    raw = [{"backbone": groups[0], "count": 2}, {"backbone": groups[1], "count": 1}]
    from edgetune.config import config_from_dict, config_to_dict

    config = config_from_dict({**config_to_dict(config), "group": raw})
    summary = run_simulation(config, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert set(row["global_perplexity"]) == set(groups)
    for family in groups:
        first, last = rows[0]["global_perplexity"][family], rows[-1]["global_perplexity"][family]
        assert math.isfinite(last) and last < first, (family, first, last)
    assert summary["final_global_perplexity"] == rows[-1]["global_perplexity"]
    assert set(summary["samples"]) == set(groups)
    assert all(len(s) == 3 for s in summary["samples"].values())
    assert "perplexity" in (tmp_path / "table.txt").read_text()


def test_llm_config_is_the_issues_run():
    import edgetune

    config = load_config(Path(edgetune.__file__).parent / "configs" / "llm.toml")
    assert config.task == "lm" and config.strategy == "fedadapter"
    tiers = [(g.backbone, g.quant, g.count) for g in config.groups]
    assert tiers == [("smollm2-135m", "nf4", 2), ("gemma3-270m", "int8", 2)]
    assert config.data.dataset == "fortunes" and config.data.alpha < 1.0  # label skew
    # one adapter config serves both depths (30 and 18 blocks)
    assert config.adapter.adapted_blocks(18) and config.adapter.anchor_blocks(18)


def test_the_isolated_reference_of_an_lm_run_reports_each_familys_perplexity(tmp_path):
    """The ablation beside an lm run (no global branch across families) is read by perplexity."""
    from edgetune.config import config_from_dict, config_to_dict
    from edgetune.sim.references import run_reference

    config = load_config(TINY, ["task=lm", "strategy=isolated", "rounds=1"])
    raw = [{"backbone": "tiny-llama-d32-l2"}, {"backbone": "tiny-gemma3-d48-l2"}]
    summary = run_reference(config_from_dict({**config_to_dict(config), "group": raw}), tmp_path)
    for family, row in summary["per_family"].items():
        metrics = (Path(row["out"]) / "metrics.jsonl").read_text().splitlines()
        assert row["perplexity"] == json.loads(metrics[-1])["global_perplexity"][family]


def test_llm_classify_config_is_smollm2_nf4_classification():
    import edgetune

    config = load_config(Path(edgetune.__file__).parent / "configs" / "llm_classify.toml")
    assert config.task == "classify" and config.strategy == "fedadapter"
    assert [(g.backbone, g.quant) for g in config.groups] == [("smollm2-135m", "nf4")]
