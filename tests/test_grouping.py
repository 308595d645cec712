"""Eq. 3, Eq. 4 and Algorithm 1 on small hand-made cases."""
import numpy as np
import pytest
import torch

from spvr_lib.grouping import correlation_matrix, group_neurons, reduce_feature_maps


def test_correlation_matches_numpy_pearson():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(50, 6, generator=g)
    C = correlation_matrix(S)
    assert C.shape == (6, 6) and C.dtype == torch.float64
    np.testing.assert_allclose(C.numpy(), np.corrcoef(S.double().numpy(), rowvar=False), atol=1e-12)


def test_eq4_reduces_feature_maps_by_abs_sum():
    S = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[-1.0, -1.0], [-1.0, -1.0]]]])  # [1, 2, 2, 2]
    assert torch.equal(reduce_feature_maps(S), torch.tensor([[6.0, 4.0]]))
    maps = torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(correlation_matrix(maps), correlation_matrix(maps.abs().sum(dim=(2, 3))))


def test_dead_channel_gets_zero_correlation_not_nan():
    S = torch.tensor([[1.0, 0.0, 2.0], [2.0, 0.0, 4.1], [3.0, 0.0, 5.9], [0.5, 0.0, 1.0]])
    C = correlation_matrix(S)
    assert not torch.isnan(C).any()
    assert C[1].tolist() == [0.0, 1.0, 0.0] and C[:, 1].tolist() == [0.0, 1.0, 0.0]
    assert C[0, 2] > 0.99


def test_algorithm1_hand_made():
    C = torch.tensor([[1.0, 0.2, 0.9, 0.1],
                      [0.2, 1.0, 0.3, 0.8],
                      [0.9, 0.3, 1.0, 0.4],
                      [0.1, 0.8, 0.4, 1.0]])
    assert group_neurons(C, 2) == [[0, 2], [1, 3]]
    assert group_neurons(C, 3) == [[0, 1, 2], [3]]      # last group smaller than d
    assert group_neurons(C, 1) == [[0], [1], [2], [3]]
    assert group_neurons(C, 10) == [[0, 1, 2, 3]]


def test_algorithm1_skips_grouped_rows_and_masks_taken_columns():
    # row 0 takes {0, 3}; row 1 must not take 3 (already grouped) even though it is its best match
    C = torch.tensor([[1.0, 0.0, 0.0, 0.9],
                      [0.0, 1.0, 0.5, 0.95],
                      [0.0, 0.5, 1.0, 0.0],
                      [0.9, 0.95, 0.0, 1.0]])
    assert group_neurons(C, 2) == [[0, 3], [1, 2]]


def test_algorithm1_ties_go_to_lower_index():
    C = torch.tensor([[1.0, 0.5, 0.5, 0.5],
                      [0.5, 1.0, 0.5, 0.5],
                      [0.5, 0.5, 1.0, 0.5],
                      [0.5, 0.5, 0.5, 1.0]])
    assert group_neurons(C, 2) == [[0, 1], [2, 3]]
    # duplicated channels (correlation 1 off the diagonal): the row itself still wins by index
    assert group_neurons(torch.ones(3, 3), 2) == [[0, 1], [2]]


def test_algorithm1_dead_channel_end_to_end():
    S = torch.tensor([[1.0, 0.0, 2.0, 5.0], [2.0, 0.0, 4.0, 1.0], [3.0, 0.0, 6.5, 2.0]])
    groups = group_neurons(correlation_matrix(S), 2)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    assert groups[0] == [0, 2]


@pytest.mark.parametrize("d", [0, -1, 1.5, True])
def test_bad_group_size(d):
    with pytest.raises(ValueError, match="group size d"):
        group_neurons(torch.eye(3), d)


def test_bad_matrix():
    with pytest.raises(ValueError, match="square"):
        group_neurons(torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match="NaN"):
        group_neurons(torch.full((2, 2), float("nan")), 1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        correlation_matrix(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[n, m\]"):
        correlation_matrix(torch.zeros(3))
