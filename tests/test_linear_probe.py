import math

import pytest
import torch

from capt_lib.evaluation.linear_probe import fit_linear_probe, linear_probe_accuracy, predict_linear_probe


def clusters(n_per_class: int, seed: int):
    # Three classes around orthogonal directions in 8 dimensions, with small noise.
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:3] * 3.0
    labels = torch.arange(3).repeat_interleave(n_per_class)
    features = centres[labels] + 0.3 * torch.randn(len(labels), 8, generator=generator)
    return features, labels


def test_separable_clusters_are_classified():
    train_x, train_y = clusters(10, seed=0)
    test_x, test_y = clusters(50, seed=1)
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y, 3, weight_decay=1e-3) == 1.0


def test_symmetric_two_point_optimum():
    # x = +e1 (class 0) and -e1 (class 1). By symmetry W = [[a, 0], [-a, 0]] and the
    # loss is log(1 + exp(-2a)) + 2 * wd * a^2, so a solves 4 * wd * a = 2 / (1 + exp(2a)).
    wd = 0.01
    low, high = 0.0, 50.0
    for _ in range(100):
        mid = (low + high) / 2
        if 4 * wd * mid < 2 / (1 + math.exp(2 * mid)):
            low = mid
        else:
            high = mid
    a = (low + high) / 2

    features = torch.tensor([[2.0, 0.0], [-5.0, 0.0]])  # the probe normalises them to +-e1
    probe = fit_linear_probe(features, torch.tensor([0, 1]), 2, weight_decay=wd, steps=500)

    expected = torch.tensor([[a, 0.0], [-a, 0.0]])
    torch.testing.assert_close(probe.weight, expected, atol=1e-4, rtol=1e-4)
    assert abs(float(probe.bias[0] - probe.bias[1])) < 1e-4


def test_fit_is_deterministic_and_frozen():
    x, y = clusters(5, seed=2)
    first = fit_linear_probe(x, y, 3, weight_decay=1e-3, seed=7)
    second = fit_linear_probe(x, y, 3, weight_decay=1e-3, seed=7)
    assert torch.equal(first.weight, second.weight)
    assert not first.weight.requires_grad


def test_predict_uses_normalised_features():
    probe = torch.nn.Linear(2, 2)
    with torch.no_grad():
        probe.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        probe.bias.copy_(torch.tensor([0.0, 0.5]))
    # [0.3, 0.1] scores 0.3 vs 0.6 raw but 0.949 vs 0.816 once normalised to [0.949, 0.316].
    # [0.6, 0.8] has unit norm already and scores 0.6 vs 1.3.
    predictions = predict_linear_probe(probe, torch.tensor([[0.3, 0.1], [0.6, 0.8]]))
    assert predictions.tolist() == [0, 1]


def test_invalid_inputs_raise():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit_linear_probe(x, torch.tensor([0, 1, 2, 0]), 2)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        fit_linear_probe(x, torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="features must have shape"):
        fit_linear_probe(torch.zeros(4), torch.tensor([0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="weight_decay"):
        fit_linear_probe(x, torch.tensor([0, 1, 0, 1]), 2, weight_decay=-1.0)
