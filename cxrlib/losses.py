"""Losses for the imbalanced COVID task: cross-entropy, class-weighted cross-entropy and focal loss; and the
14-finding BCE of ChestX-ray14 pretraining (`bce_loss`).

The COVID losses take logits of shape (N, C) and integer targets (N,); the binary task uses its 2-logit
head, so one softmax formulation serves both tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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


def make_loss(
    name: str,
    class_weights: Sequence[float] | None = None,
    gamma: float = 2.0,
    alpha: Sequence[float] | None = None,
) -> nn.Module:
    """The loss `name` (ce | weighted_ce | focal); weighted_ce needs the training set's `class_weights`
    (data.class_weights: inverse class frequency, the weighted sampler's weights too)."""
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "weighted_ce":
        if class_weights is None:
            raise CXRError("loss=weighted_ce needs the class weights of the training set (data.class_weights)")
        return nn.CrossEntropyLoss(weight=torch.as_tensor(class_weights, dtype=torch.float32))
    if name == "focal":
        return FocalLoss(gamma=gamma, alpha=alpha)
    raise CXRError(f"parameter loss={name!r}: choose one of {', '.join(LOSSES)}")


def bce_loss(train_targets: np.ndarray, class_weighted: bool) -> nn.BCEWithLogitsLoss:
    """BCE on 14 logits; class-weighted: pos_weight = negatives / positives per finding (1 where no positive).

    CheXNet weighted positives by |N|/(|P|+|N|) and negatives by |P|/(|P|+|N|); pos_weight = |N|/|P| gives
    the same ratio (the per-finding scale differs, which Adam largely absorbs).
    """
    if not class_weighted:
        return nn.BCEWithLogitsLoss()
    pos = train_targets.sum(axis=0)
    neg = len(train_targets) - pos
    weight = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    return nn.BCEWithLogitsLoss(pos_weight=torch.as_tensor(weight, dtype=torch.float32))
