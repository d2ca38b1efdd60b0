"""The ``lm`` task: causal-LM fine-tuning of the adapter on a client's own texts.

The loss is the next-token cross-entropy over real tokens only: a position counts when both it
and the token it predicts are unmasked, so padding never enters the loss or the perplexity.
The LM head is applied in chunks of ``CHUNK_TOKENS`` positions, each under activation
checkpointing while training, so a step never holds the whole [tokens, vocab] logits (537 MB
in fp32 for a 512-token Gemma-3 step with its 262,144-token vocabulary; one chunk of 256
positions is 268 MB, and its backward recomputes it). Evaluation reports the mean token NLL as
`EvalResult.loss` (perplexity = exp of it) and next-token accuracy as `EvalResult.accuracy`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from edgetune.errors import ConfigError

CHUNK_TOKENS = 256
#: fixed prompts every `lm` run's report continues greedily with each family's final model
SAMPLE_PROMPTS = (
    "The best way to learn a new language is",
    "A computer program is",
    "The law says that",
)


def is_lm(model: nn.Module) -> bool:
    """True for the `lm` task model (`edgetune.models.heads.CausalLM`)."""
    return bool(getattr(model, "is_lm", False))


def _chunk_stats(model: nn.Module, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    logits = model.logits(hidden)
    nll = nn.functional.cross_entropy(logits, targets, reduction="sum")
    return nll, (logits.argmax(-1) == targets).sum()


def token_stats(
    model: nn.Module, features: dict[str, Tensor], chunk: int = CHUNK_TOKENS
) -> tuple[Tensor, int, int]:
    """(summed NLL, real next-token positions, correct argmax predictions) of one batch; the
    LM head runs on ``chunk`` positions at a time."""
    ids, mask = features["input_ids"], features["attention_mask"].bool()
    hidden = model(input_ids=ids, attention_mask=features["attention_mask"])
    valid = mask[:, 1:] & mask[:, :-1]  # predict token t+1 from position t, both real
    states, targets = hidden[:, :-1][valid], ids[:, 1:][valid]
    nll = hidden.new_zeros((), dtype=torch.float32)
    correct = 0
    for start in range(0, len(targets), chunk):
        h, t = states[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            part, hits = checkpoint(_chunk_stats, model, h, t, use_reentrant=False)
        else:
            part, hits = _chunk_stats(model, h, t)
        nll, correct = nll + part, correct + int(hits)
    return nll, len(targets), correct


def lm_loss(model: nn.Module, features: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Mean next-token NLL over the batch's real tokens, and their count."""
    nll, n, _ = token_stats(model, features)
    return nll / max(n, 1), n


@torch.no_grad()
def evaluate_lm(model: nn.Module, data, batch_size: int = 16) -> tuple[float, float, int]:
    """(next-token accuracy, token-weighted mean NLL, texts): the fields of
    `edgetune.client.trainer.EvalResult`, which `evaluate` wraps (perplexity = exp(NLL))."""
    if len(data) == 0:
        return float("nan"), float("nan"), 0
    model.eval()
    nll_sum, tokens, correct = 0.0, 0, 0
    for index in torch.arange(len(data)).split(batch_size):
        features, _ = data.batch(index)
        nll, n, hits = token_stats(model, features)
        nll_sum, tokens, correct = nll_sum + float(nll), tokens + n, correct + hits
    if tokens == 0:
        raise ConfigError("the evaluation texts hold no next-token position (all 1 token long)")
    return correct / tokens, nll_sum / tokens, len(data)


def measure_lm_step_flops(model: nn.Module, params: list, data, batch_size: int):
    """(FLOPs, samples) of one forward + backward of the LM loss on the first batch."""
    from edgetune.measure.flops import flop_counter

    features, _ = data.batch(torch.arange(min(batch_size, len(data))))
    model.train()
    with flop_counter() as counter:
        lm_loss(model, features)[0].backward()
    for param in params:
        param.grad = None
    model.eval()
    return int(counter.get_total_flops()), len(features["input_ids"])


@torch.no_grad()
def greedy_samples(
    model: nn.Module, tokenizer, prompts: tuple[str, ...] = SAMPLE_PROMPTS, tokens: int = 24
) -> list[dict[str, str]]:
    """Each prompt with its greedy continuation by the task model's backbone (adapters in)."""
    from edgetune.models.gguf import greedy_continuation

    model.eval()
    return [
        {"prompt": p, "continuation": greedy_continuation(model.body, tokenizer, p, tokens)}
        for p in prompts
    ]


SAMPLES_FILE = "samples.json"


def write_samples(model: nn.Module, tokenizer, folder: Path) -> Path:
    """`greedy_samples` of ``model`` as ``folder/samples.json`` (the run report reads it)."""
    path = folder / SAMPLES_FILE
    path.write_text(json.dumps(greedy_samples(model, tokenizer), indent=1))
    return path
