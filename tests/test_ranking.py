"""Eq. 2 and the KL criterion: the paper's worked example (Section 3.1.1) and invariants."""
import math

import pytest
import torch

from spvr_lib.criteria import kl_loss, spvr_loss

P = torch.tensor([[0.1, 0.3, 0.6]])
P_MASKED = torch.tensor([[[0.1, 0.6, 0.3]], [[0.01, 0.1, 0.89]], [[0.1, 0.8, 0.1]]])


def test_worked_example_spvr():
    # Section 3.1.1: L = 1.3, 0.29, 1.5
    assert torch.allclose(spvr_loss(P, P_MASKED), torch.tensor([1.3, 0.29, 1.5]), atol=1e-6)


def test_worked_example_kl():
    # Section 3.1.1: KL = 0.20, 0.32, 0.78 (nats)
    expected = [0.3 * math.log(0.3 / 0.6) + 0.6 * math.log(0.6 / 0.3),
                0.1 * math.log(0.1 / 0.01) + 0.3 * math.log(0.3 / 0.1) + 0.6 * math.log(0.6 / 0.89),
                0.3 * math.log(0.3 / 0.8) + 0.6 * math.log(0.6 / 0.1)]
    kl = kl_loss(P, P_MASKED)
    assert torch.allclose(kl, torch.tensor(expected), atol=1e-6)
    assert [math.floor(v * 100) / 100 for v in kl.tolist()] == [0.20, 0.32, 0.78]   # the paper truncates
    # the paper's point: KL ranks neuron 2 above neuron 1, Eq. 2 ranks it below
    assert kl[1] > kl[0] and spvr_loss(P, P_MASKED)[1] < spvr_loss(P, P_MASKED)[0]


def test_sums_over_samples():
    p = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    pm = torch.tensor([[[0.4, 0.6], [0.2, 0.8]],      # flips sample 0 (1 + 0.3), sample 1 unchanged
                       [[0.7, 0.3], [0.5, 0.5]]])     # sample 1: tie -> argmax 0 -> flip (1 + 0.3)
    assert torch.allclose(spvr_loss(p, pm), torch.tensor([1.3, 1.3]))
    assert torch.allclose(spvr_loss(p, p.unsqueeze(0)), torch.zeros(1))
    assert torch.allclose(kl_loss(p, p.unsqueeze(0)), torch.zeros(1), atol=1e-7)


def test_pixels_are_summed_like_samples():
    # Section 5.5: segmentation sums L over pixels; [n, c, h, w] equals the flattened [n*h*w, c] case
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 4, 5, generator=g), dim=1)
    pm = torch.softmax(torch.randn(6, 2, 3, 4, 5, generator=g), dim=2)
    flat_p = p.permute(0, 2, 3, 1).reshape(-1, 3)
    flat_pm = pm.permute(0, 1, 3, 4, 2).reshape(6, -1, 3)
    assert torch.allclose(spvr_loss(p, pm), spvr_loss(flat_p, flat_pm), atol=1e-5)
    assert torch.allclose(kl_loss(p, pm), kl_loss(flat_p, flat_pm), atol=1e-5)


def test_kl_finite_when_masked_prob_is_zero():
    p = torch.tensor([[0.5, 0.5]])
    pm = torch.tensor([[[1.0, 0.0]]])
    assert torch.isfinite(kl_loss(p, pm)).all()


@pytest.mark.parametrize("fn", [spvr_loss, kl_loss])
@pytest.mark.parametrize("p, pm, msg", [
    (torch.rand(3), torch.rand(2, 3), "p must be"),
    (torch.rand(4, 3), torch.rand(4, 3), "p_masked must be"),
    (torch.rand(4, 3), torch.rand(2, 5, 3), "p_masked must be"),
    ([[0.5, 0.5]], torch.rand(1, 1, 2), "torch tensors"),
])
def test_bad_shapes(fn, p, pm, msg):
    with pytest.raises(ValueError, match=msg):
        fn(p, pm)
