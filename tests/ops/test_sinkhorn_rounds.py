"""Sinkhorn-Knopp round by round against the paper's iteration in float64 (tests/paper.py).

At 20 rounds on ordinary logits every variant has converged to the same matrix, so a wrong first round, a round
too many or too few, or a wrong axis can hide there. With 1 to 3 rounds on spread-out logits (scale 3) the
iterates are far from converged and each round shows.
"""

import pytest
import torch

import mhc_rewrite  # noqa: F401  (registers torch.ops.mhc)
from mhc_rewrite.ops import sinkhorn_knopp_ref
from mhc_rewrite.ops.sinkhorn import sinkhorn_knopp_backward_ref

import paper
from tolerances import assert_close

mhc = torch.ops.mhc


def _logits(n=4, seed=0):
    return 3 * torch.randn(6, n, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("n", [3, 4])
def test_few_rounds_match_the_paper(iters, n):
    logits = _logits(n)
    want = paper.sinkhorn(logits.double(), iters)
    for got in (mhc.sinkhorn_knopp(logits, iters), sinkhorn_knopp_ref(logits, iters)):
        assert got.dtype == torch.float32
        assert_close(got, want, "coefficients")


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_few_rounds_gradients_match_float64_autograd(iters):
    logits = _logits().requires_grad_()
    logits64 = logits.detach().double().requires_grad_()
    weights = torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (grad,) = torch.autograd.grad((weights.float() * mhc.sinkhorn_knopp(logits, iters)).sum(), logits)
    (grad64,) = torch.autograd.grad((weights * paper.sinkhorn(logits64, iters)).sum(), logits64)
    assert_close(grad, grad64, "sinkhorn_grad")
    (grad_ref,) = torch.autograd.grad((weights.float() * sinkhorn_knopp_ref(logits, iters)).sum(), logits)
    assert_close(grad_ref, grad64, "sinkhorn_grad")


def test_bf16_logits_are_projected_in_float32_and_their_gradient_is_bf16():
    logits = _logits().bfloat16()
    want = paper.sinkhorn(logits.double(), 2)
    for got in (mhc.sinkhorn_knopp(logits, 2), sinkhorn_knopp_ref(logits, 2)):
        assert got.dtype == torch.float32
        assert_close(got, want, "coefficients")  # bf16 arithmetic would miss by ~1e-2
    grad = mhc.sinkhorn_knopp_backward(torch.randn(6, 4, 4).bfloat16(), logits, 2)
    assert grad.dtype == torch.bfloat16


def test_float64_logits_stay_float64():
    logits = _logits().double()
    assert_close(mhc.sinkhorn_knopp(logits, 3), paper.sinkhorn(logits, 3), "float64")
    assert_close(sinkhorn_knopp_ref(logits, 3), paper.sinkhorn(logits, 3), "float64")


def test_zero_rounds_are_refused():
    with pytest.raises(ValueError, match="at least one round"):
        mhc.sinkhorn_knopp(_logits(), 0)


def test_the_reference_backward_computes_in_float32_whatever_the_dtypes():
    """The documented contract: the math runs in float32 (float64 stays float64); the gradient has the logits' dtype."""
    logits, grad = _logits(), torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(2))
    in_float32 = sinkhorn_knopp_backward_ref(grad, logits, 3)
    got = sinkhorn_knopp_backward_ref(grad.bfloat16(), logits.bfloat16(), 3)
    assert got.dtype == torch.bfloat16
    want = sinkhorn_knopp_backward_ref(grad.bfloat16().float(), logits.bfloat16().float(), 3)
    assert torch.equal(got, want.bfloat16())
    assert torch.equal(sinkhorn_knopp_backward_ref(grad.double(), logits, 3), in_float32)  # a float64 grad too
