"""The per-worker training pieces without a cluster: losses checked by hand on a tiny batch."""

import math

import pytest
import torch

from pipelines.common import resource_plan
from pipelines.config import ROOT, load_config
from pipelines.train import batch_loss, warmup_epochs


class Fixed(torch.nn.Module):
    """Returns preset logits per sample (plus 0 * a parameter, so a loss has a graph)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits + 0 * self.p


def _cfg(*over):
    return load_config(ROOT / "configs/smoke.yaml", list(over))


def test_weighted_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    batch = {"image": torch.zeros(3, 3, 4, 4), "label": torch.tensor([0, 0, 1]),
             "w": torch.tensor([0.5, 2.0, 0.5])}
    loss, out, extra = batch_loss(Fixed(logits), batch, "consistency", _cfg())
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(1.0)), math.log(2.0)]
    expected = (0.5 * ce[0] + 2.0 * ce[1] + 0.5 * ce[2]) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert extra["w_mean"] == pytest.approx(1.0)
    erm, _, _ = batch_loss(Fixed(logits), batch, "erm", _cfg())  # erm ignores the weights
    assert float(erm) == pytest.approx(sum(ce) / 3, rel=1e-6)


def test_scaat_loss_with_lam_zero_is_cross_entropy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    loss, logits, extra = batch_loss(model, {"image": x, "label": y}, "scaat", _cfg("scaat.lam=0"))
    assert float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(model(x), y)), rel=1e-6)
    assert extra["eps_mean"] > 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_warmup_epochs_and_resource_plan():
    cfg = _cfg("train.epochs=6", "consistency.rounds=3", "consistency.round_epochs=2")
    assert warmup_epochs(cfg) == 2
    plan = resource_plan(2, num_workers=2)  # RAY_NOTES: never take every CPU on a 2-CPU cluster
    assert plan.actors == 1 and plan.actors * plan.actor_cpus <= 1
    assert 2 * plan.train_worker_cpus <= 1
    big = resource_plan(16, num_workers=4, actors=0)
    assert big.actors == 15 and big.train_worker_cpus == 1.0
