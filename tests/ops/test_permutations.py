"""mHC-lite's coefficient op: exact double stochasticity, its hand-written backward, its identity init."""

import math

import pytest
import torch

from mhc_rewrite.ops.permutations import (
    coefficients_permutations_ref,
    identity_logit,
    num_permutation_logits,
    permutation_matrices,
)

import paper
from tolerances import GRADCHECK, assert_close

mhc = torch.ops.mhc


def mixture_float64(logits_res: torch.Tensor, n: int) -> torch.Tensor:
    """Σ_k softmax(logits)_k P_k written out with explicit index loops, in float64 (tests/paper.py)."""
    return paper.permutation_mixture(logits_res.double(), n)


def test_permutation_matrices_are_all_the_permutations_identity_first():
    p = permutation_matrices(4)
    assert p.shape == (24, 4, 4)
    assert torch.equal(p[0], torch.eye(4))
    assert torch.equal(p.sum(-1), torch.ones(24, 4)) and torch.equal(p.sum(-2), torch.ones(24, 4))
    assert len({tuple(m.flatten().tolist()) for m in p}) == 24


@pytest.mark.parametrize("n", [2, 3, 4])
def test_h_res_is_exactly_doubly_stochastic_and_matches_float64(n):
    torch.manual_seed(0)
    m, channels = num_permutation_logits(n), 8
    streams = torch.randn(5, 7, n, channels)
    phi, alpha = torch.randn(n * channels, m), torch.tensor([0.5, 0.5, 6.0])  # a large gain: spiky weights
    bias = torch.randn(m) * 3
    _, _, h_res = mhc.coefficients_permutations(streams, phi, alpha, bias, n)
    assert h_res.dtype == torch.float32 and (h_res >= 0).all()
    # exact up to float32 rounding: no iteration leaves an error behind
    ones = torch.ones(h_res.shape[:-1])
    assert_close(h_res.sum(-1), ones, "few_roundings")
    assert_close(h_res.sum(-2), ones, "few_roundings")
    # against the same mixture in float64, from the float64 logits
    _, _, ref64 = coefficients_permutations_ref(streams.double(), phi.double(), alpha.double(), bias.double(), n)
    v = streams.double().flatten(-2)
    z = (v @ phi.double()) / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
    logits_res = alpha[2].double() * z[..., 2 * n:] + bias.double()[2 * n:]
    assert_close(ref64, mixture_float64(logits_res, n), "float64", torch.float64)
    # the float32 op rounds logits of size ~30 to ~2e-6, which moves the weights by about that much
    assert_close(h_res, ref64, "permutation_weights")


def test_sinkhorn_leaves_the_columns_approximate_where_permutations_do_not():
    """The contrast that motivates mHC-lite, on logits where 20 Sinkhorn rounds have not converged."""
    torch.manual_seed(1)
    logits = torch.randn(64, 4, 4) * 8
    sinkhorn = paper.sinkhorn(logits, 20)
    assert (sinkhorn.sum(-2) - 1).abs().max() > 1e-4
    lite = mixture_float64(torch.randn(64, 24) * 8, 4)
    assert_close(lite.sum(-2), torch.ones(64, 4, dtype=torch.float64), "float64", torch.float64)


@pytest.mark.parametrize("dynamic", [True, False])
def test_backward_matches_numerical_gradients_in_float64(dynamic):
    torch.manual_seed(0)
    n, channels = 3, 4
    m = num_permutation_logits(n)
    bias = torch.randn(m, dtype=torch.float64, requires_grad=True)
    if dynamic:
        streams = torch.randn(2, 3, n, channels, dtype=torch.float64, requires_grad=True)
        phi = torch.randn(n * channels, m, dtype=torch.float64, requires_grad=True)
        alpha = torch.tensor([0.3, -0.7, 1.3], dtype=torch.float64, requires_grad=True)
        inputs = (streams, phi, alpha, bias)
    else:
        inputs = (None, None, None, bias)

    def fn(*tensors):
        return mhc.coefficients_permutations(*tensors, n)

    assert torch.autograd.gradcheck(fn, inputs, **GRADCHECK)


def test_backward_op_agrees_with_autograd_through_the_reference():
    torch.manual_seed(2)
    n, channels = 4, 6
    m = num_permutation_logits(n)
    leaves = [torch.randn(3, n, channels), torch.randn(n * channels, m) * 0.3, torch.tensor([0.4, 0.2, 2.0]),
              torch.randn(m)]
    leaves = [t.requires_grad_() for t in leaves]
    grads_out = [torch.randn(3, n), torch.randn(3, n), torch.randn(3, n, n)]
    outs = coefficients_permutations_ref(*leaves, n)
    want = torch.autograd.grad(outs, leaves, grads_out)
    got = mhc.coefficients_permutations_backward(*grads_out, *[t.detach() for t in leaves], n)
    for g, w in zip(got, want):
        assert_close(g, w, "same_math")


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_identity_logit_reproduces_sinkhorns_initial_h_res(n):
    diagonal = math.e / (math.e + n - 1)  # Sinkhorn of 1·I: the identity init's H_res
    logits = torch.zeros(math.factorial(n), dtype=torch.float64)
    logits[0] = identity_logit(n, diagonal)
    sinkhorn = paper.sinkhorn(torch.eye(n, dtype=torch.float64), 50)
    assert_close(mixture_float64(logits, n), sinkhorn, "float64", torch.float64)
