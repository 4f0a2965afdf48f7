"""mhc::coefficients against the paper's equations written out in float64 (tests/paper.py), its hand-derived
backward against float64 autograd of those equations, registration."""

import pytest
import torch

import mhc_rewrite  # noqa: F401
from mhc_rewrite.ops.coefficients import coefficients_backward_ref

import paper
from tolerances import GRADCHECK, assert_close


def coefficients(*args):
    """``torch.ops.mhc.coefficients``' three mappings (its last two outputs, the projection, are for its backward)."""
    return torch.ops.mhc.coefficients(*args)[:3]


def _params(n, C, dtype=torch.float64):
    torch.manual_seed(n + C)
    return (torch.randn(3, 5, n, C, dtype=dtype), torch.randn(n * C, n * n + 2 * n, dtype=dtype) / C,
            torch.randn(3, dtype=dtype), torch.randn(n * n + 2 * n, dtype=dtype))


@pytest.mark.parametrize("n,C", [(4, 8), (2, 16), (3, 5)])
def test_dynamic_mhc_matches_paper_equations(n, C):
    X, phi, alpha, bias = (t.float() for t in _params(n, C))
    expected = paper.coefficients(X, phi, alpha, bias, n, 20)
    got = coefficients(X, phi, alpha, bias, n, 20, "mhc")
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        assert_close(g, e, "coefficients")
    for g, e in zip(coefficients(*_params(n, C), n, 20, "mhc"), paper.coefficients(*_params(n, C), n, 20)):
        assert g.dtype == torch.float64
        assert_close(g, e, "float64")


def test_hc_mode_is_bias_plus_scaled_tanh():
    n, C = 4, 8
    X, phi, alpha, bias = _params(n, C)
    for got, want in zip(coefficients(X, phi, alpha, bias, n, 20, "hc"), paper.hc_coefficients(X, phi, alpha, bias, n)):
        assert_close(got, want, "float64")


def test_static_mode_uses_bias_only():
    n = 4
    bias = torch.randn(n * n + 2 * n, dtype=torch.float64)
    pre, post, res = coefficients(None, None, None, bias, n, 20, "mhc")
    assert pre.shape == (n,) and post.shape == (n,) and res.shape == (n, n)
    for got, want in zip((pre, post, res), paper.static_coefficients(bias, n, 20)):
        assert_close(got, want, "float64")


def _paper_outputs(inputs, n, iters, mode):
    X, phi, alpha, bias = inputs
    if X is None:
        if mode == "hc":  # static HC: the bias is the mapping
            return bias[:n], bias[n:2 * n], bias[2 * n:].view(n, n)
        return paper.static_coefficients(bias, n, iters)
    if mode == "hc":
        return paper.hc_coefficients(X, phi, alpha, bias, n)
    return paper.coefficients(X, phi, alpha, bias, n, iters)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_streams_forward_and_backward(dtype):
    """bf16/fp16 streams (a cast or autocast model): the coefficients and their gradients are float32, computed
    in float32 from the rounded streams, so they match float64 on those same streams to float32 accuracy."""
    n, C = 4, 8
    X, phi, alpha, bias = (t.float() for t in _params(n, C))
    X = X.to(dtype).requires_grad_()
    params = [t.requires_grad_() for t in (phi, alpha, bias)]
    got = coefficients(X, *params, n, 20, "mhc")
    assert all(h.dtype == torch.float32 for h in got)
    ref_in = [X.detach().double().requires_grad_(), *(p.detach().double().requires_grad_() for p in params)]
    want = paper.coefficients(*ref_in, n, 20)
    for g, w in zip(got, want):
        assert_close(g, w, "coefficients")
    grads = [torch.randn_like(h) for h in got]
    got_grads = torch.autograd.grad(got, [X, *params], grads)
    want_grads = torch.autograd.grad(want, ref_in, [g.double() for g in grads])
    assert got_grads[0].dtype == dtype
    assert_close(got_grads[0], want_grads[0], "streams", dtype, msg="d_streams")
    for name, g, w in zip(("d_phi", "d_alpha", "d_bias"), got_grads[1:], want_grads[1:]):
        assert g.dtype == torch.float32
        assert_close(g, w, "coefficient_grads", msg=name)


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@pytest.mark.parametrize("dynamic", [True, False])
def test_hand_derived_backward_equals_autograd(mode, dynamic):
    """The library's hand-derived backward (float64) against autograd of the paper's equations."""
    n, C = 4, 6
    X, phi, alpha, bias = (t.requires_grad_() for t in _params(n, C))
    inputs = (X, phi, alpha, bias) if dynamic else (None, None, None, bias)
    outs = _paper_outputs(inputs, n, 7, mode)
    grads = [torch.randn_like(o) for o in outs]
    present = [t for t in inputs if t is not None]
    expected = torch.autograd.grad(outs, present, grads)
    got = [g for g in coefficients_backward_ref(*grads, *[t.detach() if t is not None else None for t in inputs],
                                                 n, 7, mode) if g is not None]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert_close(g, e, "float64")


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_gradcheck_float64(mode):
    X, phi, alpha, bias = (t.requires_grad_() for t in _params(4, 3))
    X = X[:1, :2].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: coefficients(*a, 4, 20, mode), (X, phi, alpha, bias), **GRADCHECK)
    assert torch.autograd.gradcheck(lambda b: coefficients(None, None, None, b, 4, 20, mode), (bias,), **GRADCHECK)


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
