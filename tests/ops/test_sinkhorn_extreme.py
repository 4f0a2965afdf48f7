"""Sinkhorn-Knopp's backward at extreme logits, against float64 autograd of the rounds written out in this test.

The reference runs the paper's rounds (columns, then rows, 20 times) on log M with logsumexp: the same function
as exp-and-divide, but with no underflow at any logit scale, so it stays a trustworthy float64 answer where a
float32 implementation is pushed to its limits.
"""

import pytest
import torch

import mhc_rewrite  # noqa: F401  (registers torch.ops.mhc)

from tolerances import assert_close

sinkhorn = torch.ops.mhc.sinkhorn_knopp


def _sinkhorn_float64(logits, iters):
    log_m = logits.double()
    for _ in range(iters):
        log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)  # every column sums to 1
        log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)  # every row sums to 1
    return log_m.exp()


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("scale", [10.0, 30.0, 1e2, 1e3])  # 1e2, 1e3: the scales a one-shift projection underflows at
def test_backward_at_extreme_logits_matches_float64_autograd(n, scale):
    torch.manual_seed(n)
    logits = scale * torch.randn(64, n, n).clamp(-1, 1)  # entries spread over [-scale, scale]
    grad = torch.randn(64, n, n)
    x = logits.clone().requires_grad_()
    (got,) = torch.autograd.grad(sinkhorn(x, 20), x, grad)
    reference_in = logits.double().requires_grad_()
    (want,) = torch.autograd.grad(_sinkhorn_float64(reference_in, 20), reference_in, grad.double())
    assert torch.isfinite(got).all()
    assert_close(got, want, "sinkhorn_grad" if scale <= 30 else "sinkhorn_grad_extreme")


def test_float64_backward_matches_log_domain_autograd():
    """In float64 the library's backward and autograd of the log-domain rounds agree to rounding."""
    torch.manual_seed(0)
    logits = 10 * torch.randn(32, 4, 4, dtype=torch.float64)
    grad = torch.randn(32, 4, 4, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    (got,) = torch.autograd.grad(sinkhorn(x, 20), x, grad)
    y = logits.clone().requires_grad_()
    (want,) = torch.autograd.grad(_sinkhorn_float64(y, 20), y, grad)
    assert_close(got, want, "float64")
