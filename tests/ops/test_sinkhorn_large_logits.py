"""Sinkhorn under large logits: the projection keeps every row and column alive at any logit scale.

The references here are written out in the test: the plain 20-round iteration of the paper in float64
(``M = exp(L)``, then column and row normalisation), and the one-shift float32 iteration the library used before
(``exp(L - max L)``), which rounds whole rows to zero at large scales.
"""

import pytest
import torch

import mhc_rewrite  # noqa: F401  (registers torch.ops.mhc)

from tolerances import assert_close, tolerance

sinkhorn = torch.ops.mhc.sinkhorn_knopp
SCALES = [1.0, 1e2, 1e4]


def plain_sinkhorn(logits, iters):
    """The paper's iteration, unrolled: exp, then alternate column and row normalisation (no shift, no log)."""
    m = torch.exp(logits)
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


def one_shift_sinkhorn(logits, iters):
    """The previous float32 implementation: one shift per matrix, divisions guarded by 1e-30."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True).clamp_min(1e-30)
        m = m / m.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return m


def large_logits(scale, dtype, count=1000, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(count, n, n, generator=g)).to(dtype)


def assert_projection_holds(h):
    """Entries in [0, 1], rows sum to 1, no all-zero row or column, everything finite."""
    assert torch.isfinite(h).all()
    assert (h >= 0).all() and (h <= 1 + tolerance("sinkhorn_rows")).all()
    assert_close(h.sum(-1), torch.ones_like(h.sum(-1)), "sinkhorn_rows")
    assert (h.amax(dim=-1) > 0).all(), "a row is all zero"
    assert (h.amax(dim=-2) > 0).all(), "a column is all zero"


def test_ordinary_logits_give_the_plain_iteration():
    # identity-init-like logits with N(0, 1) spread: fp32 op against the plain iteration in float64 (within 1e-6)
    torch.manual_seed(0)
    logits = torch.randn(512, 4, 4, dtype=torch.float64) + torch.eye(4, dtype=torch.float64)
    want = plain_sinkhorn(logits, 20)
    assert_close(sinkhorn(logits.float(), 20), want, "sinkhorn")
    assert_close(sinkhorn(logits, 20), want, "float64", torch.float64)
    # and the previous float32 implementation's results (the same up to rounding)
    assert_close(sinkhorn(logits.float(), 20), one_shift_sinkhorn(logits.float(), 20), "sinkhorn")


@pytest.mark.parametrize("iters", [1, 3, 20])
def test_backward_equals_float64_autograd_of_the_unrolled_loop(iters):
    torch.manual_seed(iters)
    logits = (3 * torch.randn(64, 4, 4, dtype=torch.float64)).requires_grad_()
    grad = torch.randn(64, 4, 4, dtype=torch.float64)
    (want,) = torch.autograd.grad(plain_sinkhorn(logits, iters), logits, grad)
    (got,) = torch.autograd.grad(sinkhorn(logits, iters), logits, grad)
    assert_close(got, want, "float64", torch.float64)
    logits32 = logits.detach().float().requires_grad_()
    (got32,) = torch.autograd.grad(sinkhorn(logits32, iters), logits32, grad.float())
    assert_close(got32, want, "sinkhorn_grad")


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits_keep_every_row_and_column(scale, dtype):
    logits = large_logits(scale, dtype).requires_grad_()
    h = sinkhorn(logits, 20)
    assert h.dtype == torch.float32
    assert_projection_holds(h)
    (grad,) = torch.autograd.grad(h, logits, torch.randn_like(h))
    assert grad.dtype == dtype and torch.isfinite(grad).all()


@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_the_one_shift_iteration_loses_rows_at_these_scales(scale):
    # the regime the tests above cover is the one where the previous implementation failed
    h = one_shift_sinkhorn(large_logits(scale, torch.float32), 20)
    assert (h.amax(dim=-1) == 0).any()


@pytest.mark.parametrize("scale", SCALES)
def test_coefficients_with_large_logit_gain_keep_every_row_and_column(scale):
    # a_res = scale turns N(0, 1) projections into logits of that scale, through the coefficient op's backward too
    g = torch.Generator().manual_seed(1)
    n, C = 4, 16
    streams = torch.randn(64, n, C, generator=g).requires_grad_()
    phi = (torch.randn(n * C, n * n + 2 * n, generator=g) / (n * C) ** 0.5).requires_grad_()
    alpha = torch.tensor([1.0, 1.0, scale], requires_grad=True)
    bias = torch.zeros(n * n + 2 * n, requires_grad=True)
    h_pre, h_post, h_res = torch.ops.mhc.coefficients(streams, phi, alpha, bias, n, 20, "mhc")[:3]
    assert_projection_holds(h_res)
    grads = torch.autograd.grad(h_res, (streams, phi, alpha, bias), torch.randn_like(h_res))
    assert all(torch.isfinite(gr).all() for gr in grads)
