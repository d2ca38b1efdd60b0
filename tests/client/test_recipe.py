"""The learning recipe's pieces: the balanced loss, the head's own learning rate, and devices
that train more than one family (``[[group]].also``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from edgetune.client.trainer import label_prior_shift, train_local
from edgetune.config import ClientGroup, RunConfig, TrainConfig, load_config
from edgetune.errors import ConfigError
from edgetune.sim.evaluator import evaluation_plan, family_of
from edgetune.sim.harness import client_configs

TINY = Path(__file__).parents[1] / "data" / "tiny_sim.toml"


def test_label_prior_shift_is_the_log_of_the_add_one_smoothed_prior():
    shift = label_prior_shift(torch.tensor([0, 0, 0, 2]), 3)
    # counts [3, 0, 1] + 1 = [4, 1, 2] over 7
    assert torch.allclose(shift, torch.log(torch.tensor([4 / 7, 1 / 7, 2 / 7])))


class _Features:
    """An already-encoded split: fixed feature vectors and labels (what `EncodedSplit` holds
    for a text or image data set, here without a backbone in front)."""

    def __init__(self, x: Tensor, labels: Tensor) -> None:
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return {"x": self.x[index]}, self.labels[index]


class _Linear(nn.Module):
    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.head = nn.Linear(d, k)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


def _train(loss: str) -> nn.Module:
    """A linear classifier on two overlapping classes, 90 samples of class 0, 10 of class 1."""
    torch.manual_seed(0)
    labels = torch.tensor([0] * 90 + [1] * 10)
    x = torch.stack([labels.float() * 2 - 1, torch.ones(100)], dim=1)
    x[:, 0] += 1.2 * torch.randn(100)
    model = _Linear(2, 2)
    config = TrainConfig(epochs=20, batch_size=10, lr=0.05, loss=loss)
    train_local(model, list(model.parameters()), _Features(x, labels), config)
    return model


def test_the_balanced_loss_moves_the_boundary_back_towards_the_frequent_class():
    """Plain CE on 90:10 data puts the boundary deep into the rare class; the logit-adjusted
    loss estimates the balanced boundary, so raw logits recall the rare class far better."""
    torch.manual_seed(1)
    labels = torch.tensor([0, 1] * 500)  # a balanced test set from the same two clusters
    x = torch.stack([labels.float() * 2 - 1, torch.ones(1000)], dim=1)
    x[:, 0] += 1.2 * torch.randn(1000)
    rare = labels == 1
    recall = {}
    for loss in ("ce", "balanced"):
        pred = _train(loss)(x).argmax(-1)
        recall[loss] = float((pred[rare] == 1).float().mean())
    assert recall["balanced"] > recall["ce"] + 0.2, recall
    # The balanced boundary sits near the midpoint: it recalls most of the rare class.
    assert recall["balanced"] > 0.6, recall


def test_train_loss_and_head_lr_are_checked_by_name():
    with pytest.raises(ConfigError, match=r"train.loss='focal'"):
        TrainConfig(loss="focal")
    with pytest.raises(ConfigError, match=r"train.head_lr=-1"):
        TrainConfig(head_lr=-1.0)


def test_group_also_rejects_repeats_of_the_own_backbone():
    with pytest.raises(ConfigError, match=r"group\.also"):
        ClientGroup(backbone="tiny-bert-d32-l2", also=("tiny-bert-d32-l2",))
    with pytest.raises(ConfigError, match=r"group\.also"):
        ClientGroup(backbone="tiny-bert-d32-l2", also=("x", "x"))


def _with_also() -> RunConfig:
    also = '{backbone="tiny-bert-d32-l2", count=2, also=["tiny-bert-d48-l3"]}'
    one = '{backbone="tiny-bert-d48-l3", count=1}'
    return load_config(TINY, [f"group=[{also}, {one}]"])


def test_a_device_of_a_group_with_also_trains_each_backbone_on_its_own_shard(tmp_path):
    config = _with_also()
    assert (config.num_devices, config.num_clients, config.quorum) == (3, 5, 5)
    clients = [c.client for c in client_configs(config, tmp_path, "http://127.0.0.1:9")]
    got = [(c.backbone, c.shard, c.shards) for c in clients]
    assert got == [
        ("tiny-bert-d32-l2", 0, 3),
        ("tiny-bert-d48-l3", 0, 3),
        ("tiny-bert-d32-l2", 1, 3),
        ("tiny-bert-d48-l3", 1, 3),
        ("tiny-bert-d48-l3", 2, 3),
    ]
    assert len({c.state_dir for c in clients}) == 5  # every client keeps its own state
    # the device's first client pairs its features with the device's other backbone (the
    # bridge) and reports its frozen statistics; the device's second client does neither
    roles = [(c.bridges, c.stats_source) for c in clients]
    first = (("tiny-bert-d48-l3",), True)
    assert roles == [first, ((), False), first, ((), False), ((), True)]
    seeds = [c.train.seed for c in client_configs(config, tmp_path, "http://127.0.0.1:9")]
    assert seeds[0] == seeds[1] != seeds[2]  # the seed follows the shard


def test_the_evaluation_plan_covers_families_reached_only_through_also():
    also = '{backbone="tiny-bert-d32-l2", count=1, also=["tiny-bert-d48-l3"]}'
    config = load_config(TINY, [f"group=[{also}]"])
    families = set(evaluation_plan(config))
    assert families == {family_of("tiny-bert-d32-l2"), family_of("tiny-bert-d48-l3")}


@pytest.mark.parametrize("freeze", [True, False])
def test_a_statistics_head_trains_between_statistics_rounds_only_if_not_frozen(tmp_path, freeze):
    from edgetune.client.runtime import ClientRuntime

    config = load_config(TINY, [f"train.freeze_head={str(freeze).lower()}"])
    client = dataclasses.replace(
        config.client, backbone="tiny-bert-d32-l2", state_dir=str(tmp_path)
    )
    runtime = ClientRuntime(dataclasses.replace(config, client=client))
    assert config.train.head == "stats" and runtime.stats is not None
    trained = {id(p) for group in runtime._param_groups() for p in group["params"]}
    head = [id(p) for p in runtime.handle.head.parameters()]
    assert head and all((i in trained) != freeze for i in head)
    assert trained  # the adapter trains either way


def test_freeze_head_must_be_a_bool():
    with pytest.raises(ConfigError, match=r"train.freeze_head='no'"):
        TrainConfig(freeze_head="no")
