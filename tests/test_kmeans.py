"""Tests for the torch K-means used to pick MGDE's semantic centres."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capt_lib.modules.kmeans import kmeans, kmeans_plusplus_init


def make_blobs(directions: torch.Tensor, per_blob: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points scattered around each row of ``directions``, shuffled, with their blob labels."""
    generator = torch.Generator().manual_seed(seed)
    k, dim = directions.shape
    labels = torch.arange(k).repeat_interleave(per_blob)  # (k * per_blob,)
    points = directions[labels] + spread * torch.randn(k * per_blob, dim, generator=generator, dtype=directions.dtype)
    order = torch.randperm(k * per_blob, generator=generator)
    return points[order], labels[order]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two label vectors group the points identically, whatever the label names."""
    same_a = a.unsqueeze(0) == a.unsqueeze(1)  # (N, N)
    same_b = b.unsqueeze(0) == b.unsqueeze(1)  # (N, N)
    return bool(torch.equal(same_a, same_b))


def lloyd_reference(points: np.ndarray, centres: np.ndarray, cosine: bool, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain NumPy Lloyd loop, one point at a time, until the centres stop moving."""
    centres = centres.copy()
    for _ in range(iters):
        assignments = np.empty(len(points), dtype=np.int64)
        for i, point in enumerate(points):
            if cosine:
                assignments[i] = int(np.argmax(centres @ point))
            else:
                assignments[i] = int(np.argmin(((centres - point) ** 2).sum(axis=1)))

        new_centres = np.empty_like(centres)
        for c in range(len(centres)):
            members = points[assignments == c]
            assert len(members) > 0, "the reference loop does not handle empty clusters"
            mean = members.mean(axis=0)
            new_centres[c] = mean / np.linalg.norm(mean) if cosine else mean

        if np.array_equal(new_centres, centres):
            break
        centres = new_centres
    return centres, assignments


@pytest.mark.parametrize("cosine", [False, True])
def test_blobs_recovered_exactly(cosine):
    directions = 10.0 * torch.eye(4, dtype=torch.float64)[:3] + torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    points, labels = make_blobs(directions, per_blob=20, spread=0.3, seed=3)

    result = kmeans(points, 3, seed=0, cosine=cosine)

    assert same_partition(result.assignments, labels)


@pytest.mark.parametrize("cosine", [False, True])
def test_matches_numpy_lloyd_loop(cosine):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(120, 5, generator=generator, dtype=torch.float64)
    points = torch.nn.functional.normalize(x, dim=1) if cosine else x
    init = kmeans_plusplus_init(points, 6, generator=torch.Generator().manual_seed(11), cosine=cosine)

    result = kmeans(x, 6, seed=11, cosine=cosine, tol=0.0, iters=200)
    expected_centres, expected_assignments = lloyd_reference(points.numpy(), init.numpy(), cosine, iters=200)

    assert result.iterations < 200, "the loop hit the iteration limit, so convergence was not compared"
    np.testing.assert_array_equal(result.assignments.numpy(), expected_assignments)
    np.testing.assert_allclose(result.centres.numpy(), expected_centres, rtol=0, atol=1e-12)


def test_explicit_init_matches_seeded_init():
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    init = kmeans_plusplus_init(x, 5, generator=torch.Generator().manual_seed(4), cosine=False)

    seeded = kmeans(x, 5, seed=4, cosine=False)
    explicit = kmeans(x, 5, init_centres=init, cosine=False)

    assert torch.equal(seeded.centres, explicit.centres)
    assert torch.equal(seeded.assignments, explicit.assignments)


def test_same_seed_same_centres():
    x = torch.randn(80, 6, generator=torch.Generator().manual_seed(2))

    first = kmeans(x, 5, seed=3)
    second = kmeans(x, 5, seed=3)

    assert torch.equal(first.centres, second.centres)
    assert torch.equal(first.assignments, second.assignments)


def test_other_seed_other_init():
    x = torch.randn(80, 6, generator=torch.Generator().manual_seed(2))

    init_a = kmeans_plusplus_init(x, 5, generator=torch.Generator().manual_seed(0), cosine=False)
    init_b = kmeans_plusplus_init(x, 5, generator=torch.Generator().manual_seed(1), cosine=False)

    assert not torch.equal(init_a, init_b)


def test_plusplus_picks_distinct_rows():
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(5))

    init = kmeans_plusplus_init(x, 8, generator=torch.Generator().manual_seed(0), cosine=False)

    row_of = [int(torch.nonzero((x == centre).all(dim=1)).flatten()[0]) for centre in init]
    assert len(set(row_of)) == 8


def test_single_centre_is_mean():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 6.0]], dtype=torch.float64)

    result = kmeans(x, 1, cosine=False)

    torch.testing.assert_close(result.centres, torch.tensor([[2.0, 2.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    assert result.inertia == pytest.approx(8.0 + 4.0 + 20.0)  # squared distances to (2, 2)


def test_single_centre_cosine_is_normalised_mean():
    x = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)

    result = kmeans(x, 1, cosine=True)

    expected = torch.tensor([[1.0, 1.0]], dtype=torch.float64) / 2**0.5  # mean of the unit rows (1, 0) and (0, 1)
    torch.testing.assert_close(result.centres, expected, rtol=0, atol=1e-12)
    assert result.inertia == pytest.approx(2 * (1 - 2**-0.5))


def test_empty_cluster_takes_farthest_point():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]], dtype=torch.float64)
    init = torch.tensor([[0.0], [100.0]], dtype=torch.float64)

    result = kmeans(x, 2, init_centres=init, cosine=False, tol=0.0)

    # Step 1: every point joins centre 0, whose mean is 3.25. Centre 1 is empty and takes
    # the point farthest from its centre, 10. Step 2 splits {0, 1, 2} from {10}.
    torch.testing.assert_close(result.centres, torch.tensor([[1.0], [10.0]], dtype=torch.float64), rtol=0, atol=0)
    assert result.assignments.tolist() == [0, 0, 0, 1]
    assert result.inertia == pytest.approx(2.0)


def test_k_above_n_rejected():
    x = torch.randn(3, 2)

    with pytest.raises(ValueError, match=r"k=5.*N=3"):
        kmeans(x, 5)


@pytest.mark.parametrize(
    "x, k, match",
    [
        (torch.randn(4), 2, "non-empty"),
        (torch.randn(0, 3), 1, "non-empty"),
        (torch.randn(4, 2), 0, "k=0"),
        (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1, "NaN"),
    ],
)
def test_invalid_input_rejected(x, k, match):
    with pytest.raises(ValueError, match=match):
        kmeans(x, k)


def test_init_centres_shape_checked():
    with pytest.raises(ValueError, match=r"init_centres has shape \(3, 2\), expected \(2, 2\)"):
        kmeans(torch.randn(5, 2), 2, init_centres=torch.zeros(3, 2))
