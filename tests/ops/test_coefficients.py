"""mhc::coefficients against the paper's equations written out in float64, exact backward, registration."""

import pytest
import torch

import mhc_rewrite  # noqa: F401
from mhc_rewrite.ops.coefficients import coefficients_backward_ref, coefficients_ref
from mhc_rewrite.ops.sinkhorn import sinkhorn_knopp_ref

coefficients = torch.ops.mhc.coefficients


def _paper(X, phi_pre, phi_post, phi_res, a, b_pre, b_post, b_res, iters):
    """The paper's equations (arXiv 2512.24880) term by term: RMSNorm of vec(X), three projections,
    sigmoid / 2·sigmoid / Sinkhorn."""
    v = X.flatten(-2)
    v = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
    n = X.shape[-2]
    pre = torch.sigmoid(a[0] * (v @ phi_pre) + b_pre)
    post = 2 * torch.sigmoid(a[1] * (v @ phi_post) + b_post)
    res = sinkhorn_knopp_ref(a[2] * (v @ phi_res).unflatten(-1, (n, n)) + b_res, iters)
    return pre, post, res


def _params(n, C, dtype=torch.float64):
    torch.manual_seed(n + C)
    return (torch.randn(3, 5, n, C, dtype=dtype), torch.randn(n * C, n * n + 2 * n, dtype=dtype) / C,
            torch.randn(3, dtype=dtype), torch.randn(n * n + 2 * n, dtype=dtype))


@pytest.mark.parametrize("n,C", [(4, 8), (2, 16), (3, 5)])
def test_dynamic_mhc_matches_paper_equations(n, C):
    X, phi, alpha, bias = _params(n, C)
    phi_pre, phi_post, phi_res = phi.split([n, n, n * n], dim=-1)
    b_pre, b_post, b_res = bias.split([n, n, n * n])
    expected = _paper(X, phi_pre, phi_post, phi_res, alpha, b_pre, b_post, b_res.view(n, n), 20)
    got = coefficients(X.float(), phi.float(), alpha.float(), bias.float(), n, 20, "mhc")
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e.float(), atol=2e-5, rtol=1e-4)


def test_hc_mode_is_bias_plus_scaled_tanh():
    n, C = 4, 8
    X, phi, alpha, bias = _params(n, C)
    v = X.flatten(-2)
    z = (v @ phi) / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
    gain = torch.cat([alpha[0].repeat(n), alpha[1].repeat(n), alpha[2].repeat(n * n)])
    h = bias + gain * torch.tanh(z)
    pre, post, res = coefficients(X, phi, alpha, bias, n, 20, "hc")
    torch.testing.assert_close(torch.cat([pre, post, res.flatten(-2)], -1), h)


def test_static_mode_uses_bias_only():
    n = 4
    bias = torch.randn(n * n + 2 * n, dtype=torch.float64)
    pre, post, res = coefficients(None, None, None, bias, n, 20, "mhc")
    assert pre.shape == (n,) and post.shape == (n,) and res.shape == (n, n)
    torch.testing.assert_close(pre, torch.sigmoid(bias[:n]))
    torch.testing.assert_close(post, 2 * torch.sigmoid(bias[n:2 * n]))
    torch.testing.assert_close(res, sinkhorn_knopp_ref(bias[2 * n:].view(n, n), 20))


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@pytest.mark.parametrize("dynamic", [True, False])
def test_hand_derived_backward_equals_autograd(mode, dynamic):
    n, C = 4, 6
    X, phi, alpha, bias = (t.requires_grad_() for t in _params(n, C))
    inputs = (X, phi, alpha, bias) if dynamic else (None, None, None, bias)
    outs = coefficients_ref(*inputs, n, 7, mode)
    grads = [torch.randn_like(o) for o in outs]
    present = [t for t in inputs if t is not None]
    expected = torch.autograd.grad(outs, present, grads)
    got = [g for g in coefficients_backward_ref(*grads, *[t.detach() if t is not None else None for t in inputs],
                                                 n, 7, mode) if g is not None]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_gradcheck_float64(mode):
    X, phi, alpha, bias = (t.requires_grad_() for t in _params(4, 3))
    X = X[:1, :2].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: coefficients(*a, 4, 20, mode), (X, phi, alpha, bias))
    assert torch.autograd.gradcheck(lambda b: coefficients(None, None, None, b, 4, 20, mode), (bias,))


def test_opcheck():
    X, phi, alpha, bias = (t.float().requires_grad_() for t in _params(4, 8))
    torch.library.opcheck(torch.ops.mhc.coefficients.default, (X, phi, alpha, bias, 4, 20, "mhc"))
    torch.library.opcheck(torch.ops.mhc.coefficients.default, (None, None, None, bias, 4, 20, "mhc"))
    torch.library.opcheck(torch.ops.mhc.coefficients.default, (X, phi, alpha, bias, 4, 20, "hc"))


def test_opcheck_backward():
    X, phi, alpha, bias = (t.float() for t in _params(4, 8))
    grads = (torch.randn(3, 5, 4), torch.randn(3, 5, 4), torch.randn(3, 5, 4, 4))
    torch.library.opcheck(torch.ops.mhc.coefficients_backward.default, (*grads, X, phi, alpha, bias, 4, 20, "mhc"))
    static = (torch.randn(4), torch.randn(4), torch.randn(4, 4))
    torch.library.opcheck(torch.ops.mhc.coefficients_backward.default,
                          (*static, None, None, None, bias, 4, 20, "mhc"))
