"""Local training and evaluation of a task model whose only trainable tensors are adapters + head.

Inputs are encoded once per split (tokenised, or preprocessed images) and batched from memory;
each epoch shuffles with a seeded generator. A progress bar shows loss and samples/s; an
optional time budget stops training early (the samples actually seen are reported, so the
server weights the update correctly).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from edgetune.client.lm import evaluate_lm, is_lm, lm_loss, measure_lm_step_flops
from edgetune.config import TrainConfig
from edgetune.data.datasets import Split
from edgetune.errors import ConfigError
from edgetune.models.zoo import Backbone


@dataclass
class TrainResult:
    steps: int
    samples: int
    mean_loss: float
    seconds: float
    stopped_by_budget: bool


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    samples: int


class EncodedSplit:
    """A split encoded once: token ids + masks (padded to the longest text) or pixel tensors."""

    def __init__(self, backbone: Backbone, split: Split, max_length: int) -> None:
        self.labels = torch.as_tensor(split.labels, dtype=torch.long)
        self.features: dict[str, Tensor] = {}
        if len(self.labels) == 0:
            return
        if backbone.spec.modality == "text":
            if backbone.tokenizer is None:
                raise ConfigError(f"{backbone.spec.name} has no tokenizer for text data")
            enc = backbone.tokenizer(
                list(split.inputs),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            self.features = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        else:
            if backbone.preprocess is None:
                raise ConfigError(f"{backbone.spec.name} has no image preprocessing")
            self.features = {"pixel_values": backbone.preprocess(np.asarray(split.inputs))}

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        features = {k: v[index] for k, v in self.features.items()}
        if "attention_mask" in features:  # trim padding shared by the whole batch
            width = int(features["attention_mask"].sum(1).max())
            features = {k: v[:, :width] for k, v in features.items()}
        return features, self.labels[index]


def label_prior_shift(labels: Tensor, n_classes: int) -> Tensor:
    """log of the client's own label prior, add-one smoothed: [n_classes].

    The balanced loss trains ``softmax(logits + shift)``; at inference the raw logits are
    used, which estimates the classifier of a uniform label prior (logit adjustment, Menon
    et al. 2021): under label skew a client's rare classes are not traded away for its
    frequent ones (FedLC). The add-one smoothing keeps a class the client does not hold in
    the softmax as a down-weighted negative; dropping such classes altogether (FedRS at 0)
    measured 6 points worse on the demo split (68.5 vs 74.6 for MiniLM-L6, seed 0): no client
    then learns to tell its classes from the ones it lacks.
    """
    counts = torch.bincount(labels, minlength=n_classes).to(torch.float32) + 1.0
    return torch.log(counts / counts.sum())


def train_local(
    model: nn.Module,
    params: list[nn.Parameter] | list[dict],
    data: EncodedSplit,
    config: TrainConfig,
    round_id: int = 0,
    desc: str = "train",
) -> TrainResult:
    """E epochs of AdamW over `params` (a fresh optimiser each round, as in FedAvg).

    `params` is a list of tensors or of torch parameter groups (e.g. the head at its own lr).
    The `lm` task's model trains on its token loss instead (`edgetune.client.lm`).
    """
    if len(data) == 0:
        raise ConfigError("cannot train on an empty split")
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    shift = None
    if config.loss == "balanced" and not is_lm(model):
        shift = label_prior_shift(data.labels, model.head.out_features)
    generator = torch.Generator().manual_seed(config.seed * 100_003 + round_id)
    model.train()
    steps = samples = 0
    loss_sum, start, stopped = 0.0, time.perf_counter(), False
    total = config.epochs * math.ceil(len(data) / config.batch_size)
    with tqdm(total=total, desc=desc, unit="step", leave=False, mininterval=2.0) as bar:
        for _ in range(config.epochs):
            for index in torch.randperm(len(data), generator=generator).split(config.batch_size):
                features, labels = data.batch(index)
                loss = _batch_loss(model, features, labels, shift)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                steps, samples, loss_sum = (
                    steps + 1,
                    samples + len(index),
                    loss_sum + float(loss.detach()),
                )
                elapsed = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_sum / steps:.3f}", sps=f"{samples / max(elapsed, 1e-9):.1f}"
                )
                if config.time_budget_s and elapsed >= config.time_budget_s:
                    stopped = True
                    break
            if stopped:
                break
    model.eval()
    return TrainResult(
        steps, samples, loss_sum / max(steps, 1), time.perf_counter() - start, stopped
    )


def _batch_loss(model: nn.Module, features: dict, labels: Tensor, shift: Tensor | None) -> Tensor:
    """The `lm` task's mean token NLL, or cross-entropy of the logits (+ the prior shift)."""
    if is_lm(model):
        return lm_loss(model, features)[0]
    logits = model(**features)
    if shift is not None:
        logits = logits + shift.to(logits.dtype)
    return nn.functional.cross_entropy(logits, labels)


@torch.no_grad()
def evaluate(model: nn.Module, data: EncodedSplit, batch_size: int = 64) -> EvalResult:
    """Accuracy and mean cross-entropy over the whole split (`lm`: per real token)."""
    if is_lm(model):
        return EvalResult(*evaluate_lm(model, data, batch_size=min(batch_size, 16)))
    if len(data) == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    model.eval()
    correct, loss_sum = 0, 0.0
    for index in torch.arange(len(data)).split(batch_size):
        features, labels = data.batch(index)
        logits = model(**features)
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    return EvalResult(correct / len(data), loss_sum / len(data), len(data))


def measure_step_flops(
    model: nn.Module, params: list[nn.Parameter], data: EncodedSplit, batch_size: int
) -> tuple[int, int]:
    """(FLOPs, samples) of one forward + backward on the first batch, counted by FlopCounterMode.

    No optimiser step is taken and the gradients are cleared afterwards. Ops without a
    registered FLOP formula (e.g. bitsandbytes' dequantising matmuls) count as zero.
    """
    if is_lm(model):
        return measure_lm_step_flops(model, params, data, batch_size)
    from edgetune.measure.flops import flop_counter

    features, labels = data.batch(torch.arange(min(batch_size, len(data))))
    model.train()
    with flop_counter() as counter:
        nn.functional.cross_entropy(model(**features), labels).backward()
    for param in params:
        param.grad = None
    model.eval()
    return int(counter.get_total_flops()), len(labels)
