"""Linear probe: a linear classifier trained on frozen encoder features.

The features are standardised with the training set's per-dimension mean and standard
deviation (what MAE's linear probe does with a BatchNorm without affine parameters), then a
multinomial logistic regression with an L2 penalty is fitted by full-batch L-BFGS from zero
weights. The objective is convex and the start is fixed, so the result is deterministic: the
same features always give the same probe, which is what comparisons between checkpoints need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LinearProbe:
    weight: torch.Tensor  # (num_classes, C), acting on standardised features
    bias: torch.Tensor  # (num_classes,)
    mean: torch.Tensor  # (C,) standardisation statistics of the training features
    std: torch.Tensor  # (C,)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(M, C) raw features -> (M, num_classes) logits."""
        z = (features.double() - self.mean) / self.std
        return z @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(M, C) -> (M,) class indices."""
        return self.logits(features.cpu()).argmax(dim=1)

    def top1(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        if features.shape[0] == 0:
            raise ValueError("scoring a linear probe needs at least one feature")
        return float((self.predict(features) == labels.cpu().long()).double().mean())


def fit_linear_probe(
    train_features: torch.Tensor,  # (N, C)
    train_labels: torch.Tensor,  # (N,) in [0, num_classes)
    num_classes: int,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 500,
) -> LinearProbe:
    """Minimises mean cross-entropy + weight_decay / 2 * ||W||^2 (the bias is not penalised).

    This is scikit-learn's ``LogisticRegression(C=1 / (N * weight_decay))`` on the standardised
    features, solved in float64 so the optimum is reached to tight tolerances.
    """
    if train_features.ndim != 2 or train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(
            f"features {tuple(train_features.shape)} and labels {tuple(train_labels.shape)} "
            "do not match: expected (N, C) and (N,)"
        )
    if train_features.shape[0] == 0:
        raise ValueError("the linear probe needs at least one labeled training feature")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} is not allowed: >= 0")
    x = train_features.detach().double().cpu()
    y = train_labels.detach().long().cpu()
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
    mean = x.mean(dim=0)
    # A constant feature carries no information; dividing by 1 keeps it at zero instead of NaN.
    std = x.std(dim=0, unbiased=False).clamp_min(1e-12)
    std = torch.where(std < 1e-8, torch.ones_like(std), std)
    z = (x - mean) / std
    weight = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearProbe(weight=weight.detach(), bias=bias.detach(), mean=mean, std=std)


def linear_probe_top1(
    train_features: torch.Tensor,  # (N, C)
    train_labels: torch.Tensor,  # (N,)
    query_features: torch.Tensor,  # (M, C)
    query_labels: torch.Tensor,  # (M,)
    num_classes: int,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 500,
) -> float:
    """Fits the probe on the training features; its top-1 accuracy on the query features."""
    probe = fit_linear_probe(train_features, train_labels, num_classes, weight_decay=weight_decay,
                             max_iter=max_iter)
    return probe.top1(query_features, query_labels)
