"""Losses: focal loss reduces to cross-entropy, down-weights easy examples, and applies alpha per class."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxrlib import CXRError
from cxrlib.data import class_weights
from cxrlib.losses import FocalLoss, make_loss


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])


def test_ce_is_torch_cross_entropy(batch):
    logits, target = batch
    assert torch.allclose(make_loss("ce")(logits, target), F.cross_entropy(logits, target))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_focal_with_gamma_zero_and_no_alpha_is_cross_entropy(n_classes):
    torch.manual_seed(1)
    logits, target = torch.randn(16, n_classes), torch.randint(0, n_classes, (16,))
    focal = make_loss("focal", gamma=0.0)
    assert torch.allclose(focal(logits, target), F.cross_entropy(logits, target))


def test_focal_downweights_easy_examples():
    easy = torch.tensor([[4.0, 0.0, 0.0]])  # p_t ~ 0.96
    hard = torch.tensor([[0.0, 0.0, 0.0]])  # p_t = 1/3
    target = torch.tensor([0])
    ce, focal = make_loss("ce"), FocalLoss(gamma=2.0)
    assert focal(easy, target) < ce(easy, target) / 100  # (1 - 0.96)^2 shrinks it > 100x
    assert focal(hard, target) > ce(hard, target) / 3  # (2/3)^2 ~ 0.44 keeps most of it
    assert focal(easy, target) / ce(easy, target) < focal(hard, target) / ce(hard, target)


def test_focal_alpha_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 1])
    alpha, gamma = [0.25, 0.75], 2.0
    expected = 0.0
    for row, t in zip(logits.tolist(), target.tolist()):
        p_t = math.exp(row[t]) / sum(math.exp(v) for v in row)
        expected += -alpha[t] * (1 - p_t) ** gamma * math.log(p_t)
    loss = make_loss("focal", gamma=gamma, alpha=alpha)(logits, target)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)


def test_focal_alpha_length_must_match_classes(batch):
    logits, target = batch
    with pytest.raises(CXRError, match="alpha has 2 values for 3 classes"):
        make_loss("focal", alpha=[0.5, 0.5])(logits, target)


def test_weighted_ce_uses_inverse_class_frequency(batch):
    logits, target = batch
    weights = class_weights(np.repeat([0, 1, 2], [10, 30, 60]), 3)  # the weighted sampler's weights too
    assert np.allclose(weights, [100 / 30, 100 / 90, 100 / 180])
    loss = make_loss("weighted_ce", class_weights=weights)(logits, target)
    assert torch.allclose(loss, F.cross_entropy(logits, target, weight=torch.tensor(weights, dtype=torch.float32)))
    assert np.allclose(class_weights(np.array([0, 1] * 5), 2), 1)


def test_loss_errors():
    with pytest.raises(CXRError, match="loss='hinge'"):
        make_loss("hinge")
    with pytest.raises(CXRError, match="class weights"):
        make_loss("weighted_ce")
    with pytest.raises(CXRError, match="gamma"):
        make_loss("focal", gamma=-1)


def test_focal_gradient_flows_and_alpha_moves_with_device(batch):
    logits, target = batch
    logits.requires_grad_(True)
    loss_fn = make_loss("focal", alpha=[0.2, 0.3, 0.5]).to("cpu")
    loss_fn(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert "alpha" in dict(loss_fn.named_buffers())
