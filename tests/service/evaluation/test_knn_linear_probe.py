"""k-NN and linear probe on toy problems whose answers are known."""

import math

import pytest
import torch

from service.evaluation.linear_probe import fit_linear_probe, linear_probe_top1
from service.evaluation.metrics import knn_predict, knn_top1


def at_angles(degrees: list[float]) -> torch.Tensor:
    """Unit vectors in the plane, (N, 2)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def gaussian_clusters(n_per_class: int, centres: torch.Tensor, std: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    k, dim = centres.shape
    x = centres.repeat_interleave(n_per_class, 0) + std * torch.randn(k * n_per_class, dim, generator=g)
    y = torch.arange(k).repeat_interleave(n_per_class)
    return x.float(), y


def test_knn_votes_are_weighted_by_similarity_and_temperature():
    # One class-0 neighbour right next to the query, three class-1 neighbours further away.
    bank = at_angles([5, 30, 35, 40])
    labels = torch.tensor([0, 1, 1, 1])
    query = at_angles([0])
    assert knn_predict(bank, labels, query, 2, k=1).tolist() == [0]
    # k=4, T=1: weights exp(cos): exp(.996) = 2.71 for class 0 vs 2.38 + 2.27 + 2.15 = 6.8 for class 1.
    assert knn_predict(bank, labels, query, 2, k=4, temperature=1.0).tolist() == [1]
    # k=4, T=0.01: exp(99.6) for class 0 outweighs 3 * exp(86.6).
    assert knn_predict(bank, labels, query, 2, k=4, temperature=0.01).tolist() == [0]
    # Cosine similarity ignores the feature scale.
    assert knn_predict(100 * bank, labels, 0.01 * query, 2, k=1).tolist() == [0]


def test_knn_with_flat_weights_is_the_cosine_majority_vote_of_scikit_learn():
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(200, 8, generator=g), torch.randn(50, 8, generator=g)
    labels = (bank[:, 0] + 0.3 * torch.randn(200, generator=g) > 0).long()
    ours = knn_predict(bank, labels, query, 2, k=5, temperature=1e4)  # weights all ~1
    ref = KNeighborsClassifier(n_neighbors=5, metric="cosine").fit(bank.numpy(), labels.numpy())
    assert ours.tolist() == ref.predict(query.numpy()).tolist()


def test_separated_gaussian_clusters_are_classified_perfectly_by_both():
    centres = 10.0 * torch.eye(5)  # five classes, far apart relative to std 1
    train_x, train_y = gaussian_clusters(40, centres, 1.0, seed=0)
    val_x, val_y = gaussian_clusters(20, centres, 1.0, seed=1)
    assert knn_top1(train_x, train_y, val_x, val_y, 5, k=20) == 1.0
    assert linear_probe_top1(train_x, train_y, val_x, val_y, 5) == 1.0
    # Shuffled training labels carry no information: both fall to about chance (1/5).
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(2))
    assert knn_top1(train_x, train_y[perm], val_x, val_y, 5, k=20) < 0.5
    assert linear_probe_top1(train_x, train_y[perm], val_x, val_y, 5) < 0.5


def test_xor_is_solved_by_knn_but_not_by_a_linear_probe():
    # Four clusters at (+-3, +-3), label = same sign: no line separates the classes, and the
    # best linear rule is right on at most 3 of the 4 clusters.
    centres = torch.tensor([[3.0, 3.0], [-3.0, -3.0], [3.0, -3.0], [-3.0, 3.0]])
    x, cluster = gaussian_clusters(50, centres, 0.5, seed=3)
    y = (cluster >= 2).long()
    vx, vcluster = gaussian_clusters(50, centres, 0.5, seed=4)
    vy = (vcluster >= 2).long()
    assert knn_top1(x, y, vx, vy, 2, k=10) == 1.0
    assert linear_probe_top1(x, y, vx, vy, 2) <= 0.8


def test_linear_probe_is_the_l2_regularised_logistic_regression_of_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(5)
    x = 3.0 * torch.randn(300, 6, generator=g) + 1.0
    y = (x[:, 0] - x[:, 1] > 0).long() + (x[:, 2] > 2.5).long()  # three classes, overlapping
    weight_decay = 1e-2
    probe = fit_linear_probe(x, y, 3, weight_decay=weight_decay)
    z = ((x.double() - probe.mean) / probe.std).numpy()
    ref = LogisticRegression(C=1.0 / (len(y) * weight_decay), tol=1e-10, max_iter=10_000).fit(z, y.numpy())
    ours = torch.softmax(probe.logits(x), dim=1).numpy()
    assert ours == pytest.approx(ref.predict_proba(z), abs=1e-4)
    # Deterministic: a second fit gives the same weights to the bit.
    again = fit_linear_probe(x, y, 3, weight_decay=weight_decay)
    assert torch.equal(again.weight, probe.weight) and torch.equal(again.bias, probe.bias)


def test_linear_probe_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit_linear_probe(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), 2)
