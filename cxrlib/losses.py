"""Losses for the imbalanced COVID task: cross-entropy, class-weighted cross-entropy and focal loss.

All take logits of shape (N, C) and integer targets (N,); the binary task uses its 2-logit head, so one
softmax formulation serves both tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import CHOICES
from .errors import CXRError

LOSSES = CHOICES["loss"]


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017): mean of -alpha_t (1 - p_t)^gamma log p_t.

    gamma > 0 shrinks the loss of well-classified examples so training focuses on hard ones; `alpha`
    (one weight per class, optional) re-weights classes. gamma=0 without alpha is cross-entropy.
    """

    def __init__(self, gamma: float = 2.0, alpha: Sequence[float] | None = None):
        super().__init__()
        if gamma < 0:
            raise CXRError(f"parameter gamma={gamma}: focal loss needs gamma >= 0")
        self.gamma = float(gamma)
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        if self.alpha is not None:
            if self.alpha.numel() != logits.shape[1]:
                raise CXRError(f"parameter alpha has {self.alpha.numel()} values for {logits.shape[1]} classes")
            loss = self.alpha[target] * loss
        return loss.mean()


def inverse_frequency_weights(class_counts: Sequence[int]) -> torch.Tensor:
    """n_samples / (n_classes * count_c): 1 for every class when balanced (scikit-learn's "balanced")."""
    counts = torch.as_tensor(class_counts, dtype=torch.float32)
    if (counts <= 0).any():
        raise CXRError(f"class counts {list(class_counts)}: every class needs training examples for weighted_ce")
    return counts.sum() / (len(counts) * counts)


def make_loss(
    name: str,
    class_counts: Sequence[int] | None = None,
    gamma: float = 2.0,
    alpha: Sequence[float] | None = None,
) -> nn.Module:
    """The loss `name` (ce | weighted_ce | focal); weighted_ce needs the training set's `class_counts`."""
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "weighted_ce":
        if class_counts is None:
            raise CXRError("loss=weighted_ce needs the class counts of the training set")
        return nn.CrossEntropyLoss(weight=inverse_frequency_weights(class_counts))
    if name == "focal":
        return FocalLoss(gamma=gamma, alpha=alpha)
    raise CXRError(f"parameter loss={name!r}: choose one of {', '.join(LOSSES)}")
