"""The coefficient path at stream values whose squares overflow float32 (~1.8e19 and above).

The RMS divides each token's values by their largest magnitude before squaring; the reference here is the plain
formula written out in float64, where 1e20² = 1e40 is still finite.
"""

import pytest
import torch

import mhc_rewrite  # noqa: F401
from mhc_rewrite.ops.coefficients import _rms_eager, rms

import paper
from tolerances import assert_close


def plain_coefficients_float64(X, phi, alpha, bias, n):
    """H_pre, H_post and the res logits of the paper's Eq. 7-9 in float64, RMS as sqrt(mean(v²) + 1e-6)."""
    v = X.double().flatten(-2)
    z = (v @ phi.double()) / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
    gain = torch.cat([alpha[0].repeat(n), alpha[1].repeat(n), alpha[2].repeat(n * n)]).double()
    logits = z * gain + bias.double()
    return torch.sigmoid(logits[..., :n]), 2 * torch.sigmoid(logits[..., n:2 * n]), logits[..., 2 * n:]


def _inputs(magnitude, dtype, n=4, C=16):
    g = torch.Generator().manual_seed(3)
    X = (magnitude * torch.randn(8, n, C, generator=g)).to(dtype)
    phi = torch.randn(n * C, n * n + 2 * n, generator=g) / (n * C) ** 0.5
    alpha = torch.tensor([1.0, 1.0, 0.5])
    bias = 0.1 * torch.randn(n * n + 2 * n, generator=g)
    return X, phi, alpha, bias


@pytest.mark.parametrize("magnitude", [1.0, 1e20, 1e-20, "per row"])
def test_rms_matches_float64(magnitude):
    v = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    # "per row": rows from 1e-3 to 1e20 in one tensor; each row needs its own scale (one scale for the tensor
    # would round the small rows' squares to zero)
    v = v * (torch.logspace(-3, 20, 16).unsqueeze(-1) if magnitude == "per row" else magnitude)
    want = torch.sqrt(v.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.isfinite(v.pow(2).sum()) == (magnitude in (1.0, 1e-20))  # the plain fp32 formula overflows
    # each row against its own value: relative to the largest row, the small rows' errors would not show
    assert_close(rms(v).double() / want, torch.ones_like(want), "rms")
    assert_close(_rms_eager(v).double() / want, torch.ones_like(want), "rms")  # the ops' one-read form


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coefficients_at_1e20_match_float64(dtype):
    n = 4
    X, phi, alpha, bias = _inputs(1e20, dtype)
    want_pre, want_post, want_logits = plain_coefficients_float64(X, phi, alpha, bias, n)
    X = X.requires_grad_()
    h_pre, h_post, h_res = torch.ops.mhc.coefficients(X, phi, alpha, bias, n, 20, "mhc")[:3]
    assert_close(h_pre, want_pre, "coefficients")
    assert_close(h_post, want_post, "coefficients")
    # the gates would be sigmoid(bias) exactly if the RMS had overflowed to inf
    assert (h_pre - torch.sigmoid(bias[:n])).abs().max() > 1e-2
    want_res = paper.sinkhorn(want_logits.unflatten(-1, (n, n)), 20)
    assert_close(h_res, want_res, "coefficients")
    weights = torch.randn(n, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (d_X,) = torch.autograd.grad((h_pre * torch.arange(n)).sum() + (h_res * weights).sum(), X)
    X64 = X.detach().double().requires_grad_()
    pre64, _, logits64 = plain_coefficients_float64(X64, phi, alpha, bias, n)
    m = torch.exp(logits64.unflatten(-1, (n, n)))  # the paper's iteration, unrolled, in float64
    for _ in range(20):
        m = m / m.sum(-2, keepdim=True)
        m = m / m.sum(-1, keepdim=True)
    (want_d_X,) = torch.autograd.grad((pre64 * torch.arange(n)).sum() + (m * weights).sum(), X64)
    assert torch.isfinite(d_X).all()
    assert_close(d_X, want_d_X, "streams", dtype)


def test_learned_collapse_and_mhc_lite_at_1e20_match_float64():
    """The collapse gate and the mHC-lite coefficients share the overflow-safe RMS (they used the plain formula)."""
    from mhc_rewrite.ops.collapse import learned_collapse
    from mhc_rewrite.ops.permutations import coefficients_permutations_ref

    n, C = 3, 16
    g = torch.Generator().manual_seed(5)
    X = 1e20 * torch.randn(8, n, C, generator=g)
    v = X.double().flatten(-2)
    r = torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
    phi, alpha, bias = torch.randn(n * C, n, generator=g) / (n * C) ** 0.5, torch.tensor([1.0]), torch.zeros(n)
    weights = torch.sigmoid(alpha.double() * (v @ phi.double()) / r + bias.double())
    want = (weights.unsqueeze(-1) * X.double()).sum(-2)
    assert_close(learned_collapse(X, phi, alpha, bias), want, "streams", torch.float32)

    m = 2 * n + 6  # n! = 6 permutation logits
    phi, alpha, bias = torch.randn(n * C, m, generator=g) / (n * C) ** 0.5, torch.ones(3), torch.zeros(m)
    z = (v @ phi.double()) / r
    h_pre, h_post, _ = coefficients_permutations_ref(X, phi, alpha, bias, n)
    assert_close(h_pre, torch.sigmoid(z[:, :n]), "coefficients")
    assert_close(h_post, 2 * torch.sigmoid(z[:, n:2 * n]), "coefficients")
    assert (h_pre - 0.5).abs().max() > 1e-2  # the gates would be sigmoid(0) = 0.5 had the RMS overflowed
